"""What a run shows: oaif's own lines on the terminal, the libraries' logs in run.log (and
on the terminal only with verbose), the round's metrics and sample table in every tracker of
report_to (TensorBoard read back from its event file, Trackio from its database, Weights &
Biases in offline mode), and a sample table in each round's folder."""

import json
import os
import re
import sqlite3

from oaif.records import read_jsonl

from conftest import run_oaif

COMMON = ["configs/tiny_cpu.yaml", "rounds=2", "prompts_per_round=8", "generate.enforce_eager=true"]
LIBRARY_LINE = re.compile(r"\b(INFO|WARNING|DEBUG)\b|Warning:|Loading safetensors")


def library_lines(text: str) -> list[str]:
    # "[W...] utils.cpp" lines are torch's C++ writing to the process's stderr itself, past
    # Python's logging: not routable without taking over file descriptor 2 (which would
    # hide crashes), so they are the one kind allowed on a quiet terminal.
    return [line for line in text.splitlines() if LIBRARY_LINE.search(line) and not line.startswith("[W")]


def test_a_run_prints_its_own_lines_and_keeps_the_libraries_in_run_log_and_trackers(tiny_model, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "TRACKIO_DIR": str(tmp_path / "trackio")}
    r = run_oaif("run", *COMMON, f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=quiet",
                 "report_to=[tensorboard, wandb, trackio]", "tracking_project=oaif-test", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "quiet"
    ours = [line for line in r.stdout.splitlines() if not line.startswith("*") and "trackio" not in line]
    assert ours[0] == f"run directory: {run_dir}" and ours[1].startswith("precision: ")
    assert ours[2].split()[:2] == ["round", "kept"]
    assert [line.split()[0] for line in ours[3:5]] == ["0", "1"] and ours[5].startswith("done: 2 rounds")
    assert len(ours) == 6, ours
    assert not library_lines(r.stderr.split("wandb:")[0]), library_lines(r.stderr)   # wandb's summary is its own
    log = (run_dir / "run.log").read_text()
    assert re.search(r"INFO vllm\.", log) and "run directory:" in log and "done: 2 rounds" in log

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    lengths = [m["generate/mean_length"] for m in metrics]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("generate/mean_length")] == \
        [(k, round(v, 4)) for k, v in enumerate(lengths)]
    assert [e.step for e in events.Tensors("samples/text_summary")] == [0, 1]

    db = sqlite3.connect(tmp_path / "trackio/oaif-test.db")
    rows = db.execute("select step, metrics from metrics where run_name = 'quiet' order by step").fetchall()
    assert [(s, round(json.loads(m)["generate/mean_length"], 4)) for s, m in rows] == \
        [(k, round(v, 4)) for k, v in enumerate(lengths)]

    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].read_bytes().count(b"generate/mean_length") >= 2

    # Resumed, the run goes on logging to the same runs: wandb's run id and trackio's run name.
    r = run_oaif("resume", str(run_dir), "rounds=3", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(resumed) == 2 and resumed[0].name == resumed[1].name == offline[0].name, resumed
    rows = db.execute("select step from metrics where run_name = 'quiet' order by step").fetchall()
    assert rows == [(0,), (1,), (2,)]

    # Each round's sample table: its first judged pairs, with both orders' probabilities.
    judgments = read_jsonl(run_dir / "rounds/000001/judgments.jsonl")
    table = (run_dir / "rounds/000001/samples.md").read_text().splitlines()
    assert table[0].startswith("| prompt | response a | response b |") and len(table) == 2 + min(8, len(judgments))
    assert table[2].endswith(f"| {judgments[0]['verdict']} |")


def test_verbose_shows_the_library_logs_on_the_terminal(tiny_model, tmp_path):
    r = run_oaif("run", *COMMON, f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=loud", "rounds=1",
                 "verbose=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"INFO vllm\.", r.stderr), r.stderr[-2000:]


def test_a_missing_tracker_is_named_before_anything_starts(tiny_model, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shadow")}
    (tmp_path / "shadow/tensorboard").mkdir(parents=True)   # a package that fails to import stands in for none
    (tmp_path / "shadow/tensorboard/__init__.py").write_text("raise ImportError('not here')\n")
    r = run_oaif("run", *COMMON, f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=none",
                 "report_to=[tensorboard]", env=env)
    assert r.returncode == 2 and not (tmp_path / "none").exists(), r.stderr[-2000:]
    assert "report_to: tensorboard is not installed: pip install 'oaif[tensorboard]'" in r.stderr


def test_progress_bars_show_the_rounds_and_the_stage_in_flight(capsys):
    from oaif.console import Progress

    bars = Progress(1, 4, enabled=True)   # as on a terminal, resumed after round 0
    bars.start("train", 8, "step")
    for _ in range(8):
        bars.advance()
    bars.write("     1      14        2      19.6")
    bars.round_done()
    bars.close()
    out = capsys.readouterr()
    assert out.out == "     1      14        2      19.6\n"   # the row on stdout, as print puts it, above the bars
    assert re.search(r"rounds: +50%.*2/4", out.err) and re.search(r"train: +100%.*8/8", out.err), out.err
    assert not Progress(0, 4).enabled   # pytest's stderr is not a terminal: no bars
