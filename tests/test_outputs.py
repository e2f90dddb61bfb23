"""Every output oaif writes is created new; --overwrite replaces only an earlier output that
oaif wrote (a marker says so), whole (oaif/outputs.py). The commands run in-process through
oaif.cli.main; the errors come before any model loads or any pair is judged."""

import json
import shutil
from pathlib import Path

import pytest

from oaif import outputs
from oaif.cli import main
from oaif.records import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
JUDGE = '''
from pathlib import Path

def judge(prompt_messages, response_1, response_2):
    with open(Path(__file__).with_name("calls.txt"), "a") as f:   # proof that judging happened
        f.write("x")
    return 1.0 if len(response_1) < len(response_2) else 0.0
'''


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def users_folder(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text('{"mine": true}')
    (path / "notes.txt").write_text("keep me")
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from oaif.pipeline.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("outputs") / "tiny", steps=0, log=lambda _: None)


@pytest.fixture
def checkpoint(model, tmp_path) -> Path:
    """A full-weights checkpoint of a run, as `oaif export` reads it."""
    run = tmp_path / "run"
    shutil.copytree(model, run / "checkpoints/round_000000/policy")
    (run / "config.yaml").write_text(f"name: run\npolicy:\n  model: {model}\n")
    return run / "checkpoints/round_000000"


def test_export_refuses_an_existing_folder_and_replaces_only_its_own_earlier_export_whole(checkpoint, model,
                                                                                        tmp_path, capsys):
    taken = users_folder(tmp_path / "tiny-copy-with-a-file")
    before = snapshot(taken)
    assert main(["export", str(checkpoint), "--out", str(taken)]) == 2
    assert f"{taken} exists: pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--out", str(taken), "--overwrite"]) == 2   # not oaif's: left alone
    err = capsys.readouterr().err
    assert f"{taken} has no .oaif-output marker" in err and "is left alone" in err and err.count("\n") == 1
    assert snapshot(taken) == before
    # The base model (init-tiny wrote it): replaced only when asked, never by a mistaken --out.
    base = snapshot(model)
    assert main(["export", str(checkpoint), "--out", str(model)]) == 2
    assert snapshot(model) == base

    # An earlier sharded export: replaced whole, no stale shard left beside the new weights.
    out = tmp_path / "merged"
    outputs.write_folder(out, "model", lambda d: [(d / f"model-0000{i}-of-00002.safetensors").write_text("old")
                                                  for i in (1, 2)])
    assert main(["export", str(checkpoint), "--out", str(out), "--overwrite"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and not any(n.startswith("model-0000") for n in names), names
    assert json.loads((out / ".oaif-output").read_text())["entries"] == [n for n in names if n != ".oaif-output"]
    assert not list(tmp_path.glob(".merged*"))   # no staging or old folder left beside it
    (out / "notes.txt").write_text("added by hand")   # something oaif did not write: never deleted
    assert main(["export", str(checkpoint), "--out", str(out), "--overwrite"]) == 2
    assert "holds notes.txt, which oaif did not write" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "added by hand"


def test_report_out_never_deletes_a_folder_oaif_did_not_write(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "rounds").mkdir(parents=True)
    (run / "config.yaml").write_text("name: r\n")
    (run / "metrics.jsonl").write_text(json.dumps({"round": 0, "policy_version": 0, "pairs_kept": 1,
                                                   "pairs_dropped": 0, "generate/mean_length": 9.0}) + "\n")
    mine = users_folder(tmp_path / "mine")
    (mine / "report.html").write_text("<p>my own page</p>")
    before = snapshot(mine)
    for extra in ([], ["--overwrite"]):
        assert main(["report", str(run), "--out", str(mine), *extra]) == 2
        assert snapshot(mine) == before
    assert "is not an oaif report and is left alone" in capsys.readouterr().err

    # The run's own report/ is replaced on every call, also one written before markers existed.
    (run / "report").mkdir()
    (run / "report/report.html").write_text("old")
    (run / "report/length.png").write_text("old")
    assert main(["report", str(run)]) == 0 and main(["report", str(run)]) == 0
    assert (run / "report/report.html").read_text() != "old" and (run / "report/.oaif-output").is_file()
    # An explicit --out replaces an earlier oaif report with --overwrite only.
    out = tmp_path / "shared"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert main(["report", str(run), "--out", str(out)]) == 2
    assert main(["report", str(run), "--out", str(out), "--overwrite"]) == 0
    (run / "report/notes.txt").write_text("mine")
    assert main(["report", str(run)]) == 2 and (run / "report/notes.txt").read_text() == "mine"


def annotate(tmp_path: Path, out: Path, *extra: str) -> int:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "a": "Hi", "b": "Hello there"}) + "\n")
    (tmp_path / "judge.py").write_text(JUDGE)
    # No canary pairs (tiny_cpu.yaml turns them on): the judge's calls counted are this file's alone.
    return main(["annotate", str(pairs), str(ROOT / "configs/tiny_cpu.yaml"), "annotate.backend=python",
                 f"annotate.python={tmp_path / 'judge.py'}:judge", "annotate.cache=", "annotate.canary.every=0",
                 "--out", str(out), *extra])


def test_annotate_refuses_an_existing_out_before_judging_and_overwrites_only_its_own_file(tmp_path, capsys):
    calls = tmp_path / "calls.txt"
    mine = tmp_path / "judged.jsonl"
    mine.write_text('{"my": "data"}\n')
    for extra in ([], ["--overwrite"]):
        assert annotate(tmp_path, mine, *extra) == 2
        assert not calls.exists() and mine.read_text() == '{"my": "data"}\n'   # nothing judged, nothing replaced
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"oaif: error: {mine} exists: pass --overwrite to replace an earlier oaif annotate output "
                      f"there, or pick another path")
    assert "has no .judged.jsonl.oaif-output beside it" in err[1]
    # A folder, a missing parent: one line each, no traceback, nothing judged.
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert annotate(tmp_path, folder) == 2
    assert annotate(tmp_path, tmp_path / "no/such/dir/out.jsonl") == 2
    err = capsys.readouterr().err
    assert f"{folder} is a folder (or not a regular file), but an oaif annotate output is a file" in err
    assert f"folder {tmp_path / 'no/such/dir'} does not exist" in err and err.count("\n") == 2
    assert not calls.exists()

    out = tmp_path / "new.jsonl"
    assert annotate(tmp_path, out) == 0 and calls.read_text() == "xx"   # both orders
    rows = read_jsonl(out)   # the output is plain JSONL, as every reader of it expects
    assert [r["verdict"] for r in rows] == ["a"]
    assert annotate(tmp_path, out) == 2 and calls.read_text() == "xx"
    assert annotate(tmp_path, out, "--overwrite") == 0 and read_jsonl(out) == rows
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".oaif-new")]
    out.write_text(out.read_text() + '{"added": "by hand"}\n')   # changed since oaif wrote it: left alone
    assert annotate(tmp_path, out, "--overwrite") == 2
    assert "was changed since oaif wrote it" in capsys.readouterr().err and "by hand" in out.read_text()


def test_annotate_output_stays_plain_jsonl_for_offline_and_datasets(model, tmp_path):
    import datasets

    from oaif.datasets_io import load_pairs
    from oaif.models import load_tokenizer

    out = tmp_path / "judged.jsonl"
    assert annotate(tmp_path, out) == 0   # its marker is the hidden sidecar beside it, not a row
    assert len(load_pairs(out, load_tokenizer(str(model)), 256)[0]) == 1
    assert datasets.load_dataset("json", data_files=str(out))["train"][0]["verdict"] == "a"


@pytest.mark.parametrize("command", ["export", "export-pairs", "report", "annotate", "best-of-n", "eval", "critique",
                                     "train-rm", "sft", "convert-gguf", "init-tiny"])
def test_every_command_refuses_an_output_oaif_did_not_write_even_with_overwrite(command, model, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "rounds").mkdir(parents=True)
    (run / "config.yaml").write_text("name: r\n")
    (run / "metrics.jsonl").write_text(json.dumps({"round": 0, "policy_version": 0, "pairs_kept": 0,
                                                   "pairs_dropped": 0}) + "\n")
    (run / "checkpoints/round_000000/policy").mkdir(parents=True)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "a": "x", "b": "yy", "completion": "Yo."}) + "\n")
    config, model_key = str(ROOT / "configs/tiny_cpu.yaml"), f"policy.model={model}"
    file_output = command in ("annotate", "best-of-n", "eval")
    out = tmp_path / "out.jsonl" if file_output else users_folder(tmp_path / "out")
    if file_output:
        out.write_text('{"mine": 1}\n')
    argv = {"export": ["export", str(run / "checkpoints/round_000000")],
            "export-pairs": ["export-pairs", str(run)], "report": ["report", str(run)],
            "annotate": ["annotate", str(data), config, "annotate.cache="],
            "best-of-n": ["best-of-n", config, model_key, "annotate.ranking=knockout"],
            "eval": ["eval", config, model_key, f"eval.policy={model}"],
            "critique": ["critique", config, model_key], "train-rm": ["train-rm", str(data), config, model_key],
            "sft": ["sft", str(data), config, model_key], "convert-gguf": ["convert-gguf", str(data)],
            "init-tiny": ["init-tiny"]}[command]
    before = out.read_bytes() if file_output else snapshot(out)
    out_args = [str(out)] if command == "init-tiny" else ["--out", str(out)]
    assert main([*argv, *out_args]) == 2
    assert main([*argv, *out_args, "--overwrite"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and f"{out} exists: pass --overwrite" in err[0] and "is left alone" in err[1], err
    assert (out.read_bytes() if file_output else snapshot(out)) == before


def test_a_failed_write_leaves_the_earlier_output_and_no_staging(tmp_path):
    out = outputs.write_folder(tmp_path / "out", "report", lambda d: (d / "report.html").write_text("v1"))

    def half_then_fail(staging: Path) -> None:
        (staging / "report.html").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        outputs.write_folder(out, "report", half_then_fail, overwrite=True)
    assert (out / "report.html").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # A staging folder a crash left (it carries the marker from its start) is cleared by the next write.
    leftover = tmp_path / ".out.abc.oaif-new"
    leftover.mkdir()
    (leftover / ".oaif-output").write_text(json.dumps({"oaif_output": "report", "entries": []}))
    outputs.write_folder(out, "report", lambda d: (d / "report.html").write_text("v2"), overwrite=True)
    assert (out / "report.html").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # So is the temp file of a file output whose write was killed (SIGKILL runs no cleanup).
    (tmp_path / ".judged.jsonl.x1y2.oaif-new").write_text('{"half": ')
    outputs.write_jsonl(tmp_path / "judged.jsonl", "annotate output", [{"a": 1}])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".judged.jsonl.oaif-output", "judged.jsonl", "out"]


def test_links_are_never_written_through_or_replaced(tmp_path):
    target = users_folder(tmp_path / "target")
    link = tmp_path / "link"
    link.symlink_to(target)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="is a link: oaif never writes through or replaces a link"):
            outputs.write_folder(link, "report", lambda d: None, overwrite=overwrite)
    file_link = tmp_path / "file-link.jsonl"
    file_link.symlink_to(target / "notes.txt")
    with pytest.raises(FileExistsError, match="is a link"):
        outputs.write_jsonl(file_link, "annotate output", [{"a": 1}], overwrite=True)
    assert (target / "notes.txt").read_text() == "keep me" and link.is_symlink() and file_link.is_symlink()
    # An oaif output of another kind is not replaced either.
    report = outputs.write_folder(tmp_path / "report", "report", lambda d: (d / "report.html").write_text("r"))
    with pytest.raises(FileExistsError, match="holds an oaif report: it is not an oaif model"):
        outputs.check(report, "model", folder=True, overwrite=True)


def test_the_runs_own_dataset_from_before_markers_is_still_replaced_elsewhere_not(tmp_path):
    """The loop's export at the end of every run: export_pairs(run_dir, run_dir / "dataset", overwrite=True)."""
    from oaif.datasets_io import export_pairs

    run = tmp_path / "run"
    (run / "rounds").mkdir(parents=True)
    (run / "config.yaml").write_text("name: run\n")
    for folder in (run / "dataset", tmp_path / "copy"):
        (folder / "preference").mkdir(parents=True)
        (folder / "kto.parquet").write_text("old")
    export_pairs(run, run / "dataset", overwrite=True)
    assert (run / "dataset/.oaif-output").is_file() and (run / "dataset/kto.parquet").read_text("latin-1") != "old"
    export_pairs(run, run / "dataset", overwrite=True)   # and every run after
    with pytest.raises(FileExistsError, match="has no .oaif-output marker"):
        export_pairs(run, tmp_path / "copy", overwrite=True)
    assert (tmp_path / "copy/kto.parquet").read_text() == "old"


def test_init_tiny_makes_missing_parents_and_refuses_before_training(tmp_path, capsys):
    from oaif.pipeline.tiny import init_tiny

    taken = users_folder(tmp_path / "taken")
    with pytest.raises(FileExistsError, match="exists: pass --overwrite"):
        init_tiny(taken, steps=10 ** 9, log=lambda _: None)   # refused at once, not after the warm-up
    out = init_tiny(tmp_path / "models/a/tiny", steps=0, log=lambda _: None)
    assert (out / "config.json").is_file() and (out / ".oaif-output").is_file()
    assert init_tiny(out, steps=0, log=lambda _: None, overwrite=True) == out
