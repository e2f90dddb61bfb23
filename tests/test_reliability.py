"""A run stopped by a signal: it finishes the round in flight, writes a checkpoint, exits 0
with a resume line, and `oaif resume` continues it without a gap or a duplicate."""

import os
import signal
import subprocess
import sys

from oaif.records import read_jsonl

from conftest import ROOT, run_oaif


def test_sigterm_finishes_the_round_checkpoints_and_the_run_resumes(tiny_model, tmp_path):
    cmd = [sys.executable, "-m", "oaif.cli", "run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}",
           f"output_dir={tmp_path}", "name=stopped", "rounds=40", "train.checkpoint_every=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in proc.stdout:          # wait for round 1's row, then ask the run to stop
        seen.append(line)
        if line.split()[:1] == ["1"]:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    out = "".join(seen) + out
    assert proc.returncode == 0, err[-3000:]
    run_dir = tmp_path / "stopped"
    last = read_jsonl(run_dir / "metrics.jsonl")[-1]["round"]
    assert 1 <= last < 39
    assert f"stopped by SIGTERM after round {last}, checkpoint written; resume with: oaif resume {run_dir}" in out
    assert "SIGTERM: finishing this round" in err
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"round_{last:06d}"]

    r = run_oaif("resume", str(run_dir), f"rounds={last + 3}")
    assert r.returncode == 0, r.stderr[-3000:]
    rounds = [m["round"] for m in read_jsonl(run_dir / "metrics.jsonl")]
    assert rounds == list(range(last + 3))          # continuous: nothing lost, nothing twice
    for k in range(last + 3):
        pairs = read_jsonl(run_dir / f"rounds/{k:06d}/pairs.jsonl")
        assert all(p["round"] == k for p in pairs)


def test_resume_refuses_overrides_that_change_what_the_run_is(tmp_path):
    from oaif.config import dump_config, load_config

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    dump_config(load_config(ROOT / "configs/tiny_cpu.yaml"), run_dir / "config.yaml")
    for override in ("policy.model=models/other", "prompts=prompts/train.jsonl", "prompts_per_round=3", "seed=7"):
        r = run_oaif("resume", str(run_dir), override)
        key = override.split("=")[0]
        assert r.returncode == 2 and f"{key}: a resumed run keeps its {key}" in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]   # nothing touched
