"""The run directory keeps a user's run whatever they do next: re-run its saved config, start
a second process on it, leave stray files in it, point --checkpoint elsewhere, hand-edit its
config, or lose power in the middle of a checkpoint. No vLLM engine starts here: every check
fails (or the resume ends) before one would."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from oaif.checkpoint import COMPLETE, latest_checkpoint, read_trainer_state, save_checkpoint
from oaif.cli import main
from oaif.config import load_config
from oaif.models import load_tokenizer
from oaif.checkpoint import build_trainer
from oaif.records import append_jsonl, read_jsonl, write_jsonl
from oaif.rundir import RunDir, RunDirInUse, RunLock, prepare_run_dir, run_identity, start_resume

from conftest import ROOT


def fabricate(root, tiny_model, name="run", rounds=4, extra=()):
    """A run directory as three finished rounds of `oaif run` leave it (round records,
    metrics lines, a checkpoint per round with the run's identity), built without an engine."""
    prompts = root / f"{name}-prompts.jsonl"
    shutil.copy(ROOT / "prompts/train.jsonl", prompts)
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", [f"policy.model={tiny_model}", f"output_dir={root}",
                                                       f"name={name}", f"rounds={rounds}", f"prompts={prompts}",
                                                       "eval.every=0", *extra])
    run_dir, lock = prepare_run_dir(cfg)
    lock.release()
    tokenizer = load_tokenizer(cfg.policy.model)
    trainer = build_trainer(cfg, tokenizer.pad_token_id, total_steps=8)
    for k in range(3):
        for f in ("samples.jsonl", "judgments.jsonl", "pairs.jsonl"):
            write_jsonl(run_dir / "rounds" / f"{k:06d}" / f, [])
        append_jsonl(run_dir / "metrics.jsonl", {"round": k, "policy_version": k + 1})
        save_checkpoint(run_dir, k, k + 1, trainer, tokenizer, extra={"identity": run_identity(cfg)})
    return run_dir, cfg, trainer, tokenizer


@pytest.fixture(scope="module")
def made(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("made")
    return fabricate(root, tiny_model)


@pytest.fixture
def run(made, tmp_path):
    """A fresh copy of the fabricated run (its config's prompts file stays where it is)."""
    run_dir = tmp_path / "run"
    shutil.copytree(made[0], run_dir)
    return run_dir


def tree(path):
    """Every file and folder of a run, bytes included (run.log, where oaif logs the error, and
    the lock file aside)."""
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))
            if p.name not in ("run.log", ".oaif.lock")}


def test_running_a_runs_saved_config_again_never_deletes_it(tiny_model, tmp_path, capsys):
    """A run started with overwrite=true saves overwrite=false: `oaif run runs/NAME/config.yaml`
    (resume's own advice) and `oaif offline PAIRS runs/NAME/config.yaml` refuse, deleting nothing."""
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", [f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                                                       "name=r", "overwrite=true"])
    run_dir, lock = prepare_run_dir(cfg)
    lock.release()
    (run_dir / "rounds/000000").mkdir()
    assert load_config(run_dir / "config.yaml").overwrite is False
    before = tree(run_dir)
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}])
    for argv in (["run", str(run_dir / "config.yaml")], ["offline", str(pairs), str(run_dir / "config.yaml")]):
        assert main(argv) == 2
        assert f"run directory {run_dir} exists" in capsys.readouterr().err
        assert tree(run_dir) == before


def test_a_run_directory_in_use_is_neither_resumed_nor_replaced(run, tmp_path, capsys):
    """A second process on a live run is one clear line; the lock dies with its holder, even by SIGKILL."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from oaif.rundir import RunLock; "
                               "RunLock(__import__('pathlib').Path(sys.argv[1])); print('held', flush=True); "
                               "time.sleep(600)", str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(run)
        with pytest.raises(RunDirInUse, match=f"in use by another oaif process \\(pid {holder.pid}\\)"):
            RunLock(run)
        assert main(["resume", str(run)]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
        cfg = load_config(run / "config.yaml", [f"output_dir={tmp_path}", "name=run", "overwrite=true"])
        with pytest.raises(RunDirInUse):
            prepare_run_dir(cfg)
        assert tree(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunLock(run).release()   # the kernel let go of the dead holder's lock


def test_resume_leaves_files_it_did_not_write_and_reads_before_it_changes(run, made):
    """Stray files (an editor's backup, .DS_Store, an old `oaif eval` summary) are named and
    kept; a bad metrics line stops the resume before any file changes."""
    cfg = made[1]
    strays = ["rounds/.DS_Store", "rounds/000002~", "eval/round_000002.summary.jsonl", "checkpoints/notes.txt"]
    for rel in strays:
        (run / rel).parent.mkdir(exist_ok=True)
        (run / rel).write_text("mine\n")
    lines = []
    checkpoint, state = start_resume(cfg, run, run / "checkpoints/round_000001", run_identity(cfg), None,
                                     lines.append)
    assert state["round"] == 1 and checkpoint.name == "round_000001"
    assert all((run / rel).read_text() == "mine\n" for rel in strays)
    assert not (run / "rounds/000002").exists() and not (run / "checkpoints/round_000002").exists()
    assert [m["round"] for m in read_jsonl(run / "metrics.jsonl")] == [0, 1]
    assert any("not written by oaif" in line and "rounds/.DS_Store" in line for line in lines), lines

    with open(run / "metrics.jsonl", "a") as f:
        f.write("{half a line\n")
    before = tree(run)
    with pytest.raises(ValueError, match="metrics.jsonl:3"):
        start_resume(cfg, run, run / "checkpoints/round_000000", run_identity(cfg), None, lines.append)
    assert tree(run) == before


def test_a_checkpoint_of_another_run_is_refused_before_anything_is_dropped(run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    before = tree(run)
    for checkpoint in (other / "checkpoints/round_000000", run / "rounds/000000", run / "checkpoints/round_000009"):
        assert main(["resume", str(run), "--checkpoint", str(checkpoint)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--checkpoint" in err, err
        assert tree(run) == before


def test_the_newest_whole_checkpoint_is_used_and_a_broken_one_is_named(run):
    newest = run / "checkpoints/round_000002"
    assert json.loads((newest / COMPLETE).read_text())["round"] == 2
    assert latest_checkpoint(run) == newest
    with open(newest / "trainer.pt", "r+b") as f:   # the disk kept only part of it (a power cut)
        f.truncate(100)
    lines = []
    assert latest_checkpoint(run, lines.append) == run / "checkpoints/round_000001"
    assert lines == [f"skipping checkpoint {newest}: trainer.pt is missing or not the size it was written at"]
    (run / "checkpoints/round_000001" / COMPLETE).unlink()   # the save never finished its last write
    (run / "checkpoints/round_000001/trainer.pt").unlink()
    assert latest_checkpoint(run) == run / "checkpoints/round_000000"


def test_a_resume_refuses_a_run_whose_identity_changed(run, made, capsys):
    """Hand edits of the saved config, or another file behind the same path, change what the
    run is: the checkpoint's identity says so before anything is dropped."""
    before = tree(run)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(f"seed: {made[1].seed}", "seed: 7"))
    assert main(["resume", str(run)]) == 2
    assert "seed: its value changed since" in capsys.readouterr().err
    (run / "config.yaml").write_text(config)
    prompts = load_config(run / "config.yaml").prompts
    original = open(prompts).read()
    try:
        with open(prompts, "a") as f:
            f.write(json.dumps({"prompt": "a new prompt"}) + "\n")
        assert main(["resume", str(run)]) == 2
        assert "prompts: what the file holds changed since" in capsys.readouterr().err
    finally:
        open(prompts, "w").write(original)
    assert tree(run) == before
    assert read_trainer_state(run / "checkpoints/round_000002")["identity"] == run_identity(made[1])


def test_a_finished_run_whose_export_was_cut_short_gets_it_redone(tiny_model, tmp_path, capsys):
    run_dir, *_ = fabricate(tmp_path, tiny_model, rounds=3)
    assert main(["resume", str(run_dir)]) == 0   # no dataset/ yet: the run died in its end-of-run export
    assert "end-of-run export (cut short) is redone" in capsys.readouterr().out
    assert (run_dir / "dataset/preference").is_dir()
    assert main(["resume", str(run_dir)]) == 2   # done, export whole: nothing to do
    assert "rounds 0-2 are done" in capsys.readouterr().err


def test_a_start_cut_short_while_writing_its_config_can_be_retried(tmp_path):
    staging = tmp_path / ".run.new"
    (staging / "rounds").mkdir(parents=True)
    (staging / "config.yaml.tmp").write_text("seed: ")
    run_dir, lock = prepare_run_dir(load_config(None, [f"output_dir={tmp_path}", "name=run"]))
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_vllm_lora_adapters_are_pruned_by_checkpoints_and_rewound(run, made):
    cfg, trainer, tokenizer = made[1], made[2], made[3]
    for v in range(1, 6):
        (run / "adapters" / f"v{v:06d}").mkdir(parents=True)
    (run / "adapters/keep-me").mkdir()
    run_dir = RunDir(run)
    run_dir.identity, run_dir.tokenizer, trainer.version = run_identity(cfg), tokenizer, 4
    run_dir.checkpoint(3, trainer, {})
    assert sorted(p.name for p in (run / "adapters").iterdir()) == ["keep-me", "v000004", "v000005"]
    lines = []
    start_resume(cfg, run, run / "checkpoints/round_000002", run_identity(cfg), None, lines.append)
    assert sorted(p.name for p in (run / "adapters").iterdir()) == ["keep-me"]   # v4, v5: after version 3


def test_an_offline_run_resumes_as_an_offline_run_to_the_same_weights(tiny_model, tmp_path):
    """Killed after its second metrics line, then resumed: the same lines, checkpoints and
    weights as a run left alone (and no online round: no rounds/ records)."""
    import torch
    from safetensors.torch import load_file

    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"prompt": f"Say {w}.", "chosen": w, "rejected": f"I will not say {w}."}
                        for w in ("yes", "no", "maybe", "soon", "later", "never")])
    common = ["offline", str(pairs), "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
              "rounds=3", "train.checkpoint_every=1", "train.batch_size=2", "train.micro_batch_size=2"]
    env = {**os.environ, "OAIF_CRASH_AT": "metrics:2"}
    runs = {}
    for name in ("alone", "killed"):
        r = subprocess.run([sys.executable, "-m", "oaif.cli", *common, f"name={name}"], cwd=ROOT, text=True,
                           capture_output=True, env=env if name == "killed" else None)
        assert r.returncode == (-signal.SIGKILL if name == "killed" else 0), r.stderr[-2000:]
        runs[name] = tmp_path / name
    r = subprocess.run([sys.executable, "-m", "oaif.cli", "resume", str(runs["killed"])], cwd=ROOT, text=True,
                       capture_output=True)
    assert r.returncode == 0 and "3 passes over 6 pairs" in r.stdout, r.stderr[-2000:]
    assert not list(runs["killed"].glob("rounds/*"))
    lines = {n: [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in read_jsonl(d / "metrics.jsonl")]
             for n, d in runs.items()}
    assert lines["killed"] == lines["alone"] and len(lines["alone"]) == 3
    weights = {n: load_file(d / "checkpoints/round_000002/policy/model.safetensors") for n, d in runs.items()}
    assert all(torch.equal(weights["alone"][k], weights["killed"][k]) for k in weights["alone"])


def test_a_changed_eval_baseline_is_answered_again(tiny_model, tmp_path):
    """A resumed run whose eval.baseline changed does not reuse the old baseline's answers."""
    from oaif.evaluation import baseline_responses

    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", [f"policy.model={tiny_model}", "eval.every=1",
                                                       f"eval.baseline={tiny_model}", "eval.max_prompts=4"])
    (tmp_path / "eval").mkdir()
    write_jsonl(tmp_path / "eval/baseline.jsonl", [])   # the answers of another baseline
    (tmp_path / "eval/baseline.json").write_text(json.dumps({"model": "models/other", "prompts": cfg.eval.prompts,
                                                             "max_new_tokens": 1}))
    responses = baseline_responses(cfg, tmp_path, None, None, fresh=False)
    assert len(responses) == 4 and len(read_jsonl(tmp_path / "eval/baseline.jsonl")) == 4
    assert json.loads((tmp_path / "eval/baseline.json").read_text())["model"] == str(tiny_model)
    assert baseline_responses(cfg, tmp_path, None, None, fresh=False) == responses   # now read back

