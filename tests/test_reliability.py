"""Runs that meet trouble: a signal (finish the round, checkpoint, exit 0 with a resume
line), a judge endpoint that goes down (stop with a checkpoint instead of training on what is
left), a shortened kill drill, and an API key that must appear nowhere a run writes."""

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from oaif.records import read_jsonl

from conftest import ROOT, oaif_main, read_until, round_row, run_oaif
from test_openai_faults import TOP, completion


def test_sigterm_finishes_the_round_checkpoints_and_the_run_resumes(tiny_model, tmp_path):
    cmd = [sys.executable, "-m", "oaif.cli", "run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}",
           f"output_dir={tmp_path}", "name=stopped", "rounds=40", "train.checkpoint_every=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    if read_until(proc, seen, round_row(1)):   # round 1's row, then ask the run to stop
        proc.send_signal(signal.SIGTERM)
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
    for override in ("policy.model=models/other", "prompts=prompts/train.jsonl", "prompts_per_round=3", "seed=7",
                     "generate.samples_per_prompt=4"):
        r = oaif_main("resume", str(run_dir), override)
        key = override.split("=")[0]
        assert r.returncode == 2 and f"{key}: a resumed run keeps its {key}" in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]   # nothing touched


class FlakyJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible completions endpoint that answers `budget` requests, then fails
    with 503 (an endpoint going down mid-run), recording the Authorization headers it saw."""
    budget, auth = 0, set()

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        FlakyJudge.auth.add(self.headers.get("Authorization", ""))
        FlakyJudge.budget -= 1
        ok = FlakyJudge.budget >= 0
        body = json.dumps(completion("1", TOP, chat=False) if ok else {"error": {"message": "down"}}).encode()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_judge_that_goes_down_stops_the_run_with_a_checkpoint_and_the_key_leaks_nowhere(tiny_model, tmp_path):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FlakyJudge)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    key = "sk-planted-3b9d-must-not-leak"
    env = {**os.environ, "OAIF_PLANTED_KEY": key}
    FlakyJudge.budget = 20   # round 0 (8 prompts: at most 16 requests) is answered; round 1 mostly not
    try:
        r = run_oaif("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                     "name=flaky", "rounds=4", "prompts_per_round=8", "train.checkpoint_every=0",
                     "annotate.backend=openai", f"annotate.openai.base_url=http://127.0.0.1:{httpd.server_port}/v1",
                     "annotate.openai.endpoint=completions", "annotate.openai.api_key_env=OAIF_PLANTED_KEY",
                     "annotate.openai.max_retries=0", "annotate.cache=", env=env)
        run_dir = tmp_path / "flaky"
        assert r.returncode == 2, r.stderr[-3000:]
        assert "round 1: " in r.stderr and "> annotate.max_invalid_rate 0.5" in r.stderr
        assert f"Checkpoint after round 0 is written; fix the judge, then `oaif resume {run_dir}`" in r.stderr
        assert "Traceback" not in r.stderr
        assert [m["round"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [0]
        assert (run_dir / "checkpoints/round_000000/trainer.pt").is_file()

        FlakyJudge.budget = 10 ** 6   # the endpoint is back
        again = run_oaif("resume", str(run_dir), env=env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert [m["round"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert FlakyJudge.auth == {f"Bearer {key}"}   # the key was sent, and only as the header
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 10 and not [p for p in written if key.encode() in p.read_bytes()]
    assert key not in r.stdout + r.stderr + again.stdout + again.stderr


def test_every_crash_point_is_placed_and_the_nth_pass_kills():
    """The drill kills at every name in faults.POINTS: each must be placed in the code."""
    import re

    from oaif.faults import POINTS

    placed = {name for f in (ROOT / "oaif").rglob("*.py")
              for name in re.findall(r'crash_point\("(\w+)"\)', f.read_text())}
    assert placed == set(POINTS)
    code = "from oaif.faults import crash_point\nfor i in range(3):\n    print(i, flush=True)\n    crash_point('sync')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OAIF_CRASH_AT": "sync:2"})
    assert r.returncode == -signal.SIGKILL and r.stdout == "0\n1\n", (r.returncode, r.stdout, r.stderr)


def test_what_vllm_leaves_in_the_temp_folder_goes_with_the_command(tiny_model, tmp_path):
    """vLLM's engine start writes its rendezvous file (vllm_dist_*) to the temp folder, and a
    SIGKILL runs no cleanup: each `oaif` command keeps its temp files in its own
    oaif-tmp-PID folder, which it removes when it ends and the next command sweeps when it
    was killed. Nothing else in the temp folder is touched."""
    temp = tmp_path / "temp"
    (temp / "someone-elses").mkdir(parents=True)
    env = {**os.environ, "TMPDIR": str(temp)}
    r = run_oaif("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 "rounds=1", env={**env, "OAIF_CRASH_AT": "generate:1"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    left = [p for p in temp.iterdir() if p.name.startswith("oaif-tmp-")]
    assert len(left) == 1 and [p for p in left[0].iterdir() if p.name.startswith("vllm_dist_")], \
        sorted(p.name for p in temp.rglob("*"))
    r = run_oaif("report", str(tmp_path / "missing"), env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    # torch's compile cache stays where torch keeps it, to be reused by the next run
    assert sorted(p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_")) == ["someone-elses"]


@pytest.mark.slow
def test_kill_drill_shortened(tiny_model, tmp_path):
    """scripts/fault_drill.py as the README runs it, cut to three kills of the in-process mode:
    at the metrics line and half-way through a checkpoint (the points nothing else in the suite
    kills at), and one at a random moment. The full drill (every mode, 30 kills each) is stored
    in docs/reliability/."""
    out = tmp_path / "drill.md"
    r = subprocess.run([sys.executable, "scripts/fault_drill.py", "--kills", "3", "--rounds", "4", "--points",
                        "metrics,checkpoint", "--model", str(tiny_model), "--out", str(out), "--workdir",
                        str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = out.read_text()
    for row in ("| kills | 3 |", "| kills by moment | checkpoint 1, metrics 1, random 1 |",
                "| crash points not passed | - |", "| lost records | 0 |", "| duplicated records | 0 |",
                "| corrupt records | 0 |", "| stray processes | 0 |", "| stray /dev/shm entries | 0 |",
                "| stray temp files | 0 |", "| partial files left in the run directory | 0 |",
                "| final weights equal the uninterrupted run's | yes |"):
        assert row in table, table


def test_a_folder_oaif_may_not_write_is_a_one_line_error(tiny_model):
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}",
                 "output_dir=/sys/oaif-test")   # sysfs: no new folders, even for root
    with pytest.raises(OSError) as refused:   # the machine's own words: EPERM, or EROFS where /sys is read-only
        os.mkdir("/sys/oaif-test")
    assert r.returncode == 2 and f"cannot write /sys/oaif-test: {refused.value.strerror}" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_an_append_cut_short_by_a_full_disk_leaves_no_half_record(tmp_path, monkeypatch):
    """Fault injection: the disk fills up in the middle of a line (no real disk here can be
    filled on demand). The file keeps its whole records and the error says what happened."""
    import errno

    from oaif import records

    path = tmp_path / "metrics.jsonl"
    records.append_jsonl(path, {"round": 0})
    real_write = os.write
    monkeypatch.setattr(records.os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with pytest.raises(OSError) as e:
        records.append_jsonl(path, {"round": 1, "loss": 0.5})
    assert e.value.errno == errno.ENOSPC and str(path) in str(e.value)
    monkeypatch.undo()
    assert path.read_text() == '{"round": 0}\n'
    records.append_jsonl(path, {"round": 1})
    assert [r["round"] for r in read_jsonl(path)] == [0, 1]
