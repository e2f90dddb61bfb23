"""Multi-process training under `accelerate launch` (2 processes, DDP on gloo, CPU).

Rank 0 samples (from a vLLM server process it starts), judges and writes records; both
ranks train on their share of every step. Checked: a run through the CLI, stopped by a
signal to the launcher, writes one process's records; the ranks' parameters are identical
after every step; 2-process training gives the weights 1-process training gives; a second
signal stops every rank at once.
"""

import dataclasses
import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from oaif.records import Judgment, PreferencePair, Sample, read_jsonl
from oaif.train import rank_share

from conftest import ROOT, MarkedProcesses, oaif_main, read_until, round_row, versions_follow_training


def launch(*args: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/cpu_ddp_2proc.yaml -m oaif.cli ...`"""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_ddp_2proc.yaml"), "-m", "oaif.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_rank_share_pads_every_rank_to_the_same_passes():
    assert rank_share(list("abcde"), 0, 2) == (["a", "c", "e"], [1.0, 1.0, 1.0])
    assert rank_share(list("abcde"), 1, 2) == (["b", "d", "a"], [1.0, 1.0, 0.0])
    assert rank_share(["a"], 1, 2) == (["a"], [0.0])
    assert rank_share(list("abc"), 0, 1) == (list("abc"), [1.0] * 3)


def test_two_process_loop_through_the_cli_stops_on_sigterm_and_equals_one_process(tiny_model, tmp_path):
    """A 2-process run under `accelerate launch`, stopped by SIGTERM to the launcher: the
    launcher forwards it, the ranks agree (a reduce) to stop after the round in flight and
    write its checkpoint together (the launcher itself exits non-zero: torch's agent raises
    on the signal). Its records and printed rows are one process's, round for round."""
    import os
    import signal

    common = ["configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
              "prompts_per_round=8", "train.batch_size=4", "train.micro_batch_size=1", "generate.enforce_eager=true"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_ddp_2proc.yaml"), "-m", "oaif.cli", "run", *common, "name=two",
           "rounds=40", "train.check_replicas=true"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    if read_until(proc, seen, round_row(2)):   # round 2's row, then the signal
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    two_stdout = "".join(seen) + out
    assert "(2 processes)" in two_stdout and two_stdout.count("run directory") == 1, err[-4000:]   # rank 0 alone prints
    two = tmp_path / "two"
    metrics = read_jsonl(two / "metrics.jsonl")
    last = metrics[-1]["round"]
    assert 2 <= last < 39 and f"stopped by SIGTERM after round {last}, checkpoint written" in two_stdout
    assert [p.name for p in (two / "checkpoints").iterdir()] == [f"round_{last:06d}"]
    versions = versions_follow_training(metrics, trained_at_least=2)

    # Both ranks' parameters were hashed after every optimizer step and are identical.
    replicas = read_jsonl(two / "replicas.jsonl")
    assert [r["step"] for r in replicas] == list(range(1, max(m.get("train/steps", 0) for m in metrics) + 1))
    assert all(len(r["hashes"]) == 2 and r["hashes"][0] == r["hashes"][1] for r in replicas)
    assert len({r["hashes"][0] for r in replicas}) == len(replicas)   # and they change every step

    # The same kinds of records as a one-process run.
    r = oaif_main("run", *common, "name=one", f"rounds={last + 1}")
    assert r.returncode == 0, r.stderr[-3000:]
    one = tmp_path / "one"
    files = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert set(files(two)) - set(files(one)) == {"replicas.jsonl"}
    assert set(files(one)) <= set(files(two))
    fields = {"samples": Sample, "judgments": Judgment, "pairs": PreferencePair}
    for name, cls in fields.items():
        rows = read_jsonl(two / f"rounds/000002/{name}.jsonl")
        assert rows and all(set(row) == {f.name for f in dataclasses.fields(cls)} for row in rows)
    assert set(read_jsonl(one / "metrics.jsonl")[0]) == set(metrics[0])
    samples = read_jsonl(two / "rounds/000002/samples.jsonl")
    assert len(samples) == 16 and all(s["policy_version"] == versions[1] and s["token_ids"] for s in samples)

    # ... and the same records: round 0 samples the same weights with the same seeds, and every
    # later round samples weights that differ from one process's only by the order of the
    # gradient sums (within 1e-4, test below), so the same tokens are drawn. A 2-process run
    # that pushed stale weights, or sampled other prompts, would draw others.
    for k in range(last + 1):
        for name, keys in (("samples", ("prompt_id", "policy_version", "token_ids")),
                           ("pairs", ("prompt_id", "chosen", "rejected", "p_chosen"))):
            rows = [[tuple(row[key] for key in keys) for row in read_jsonl(d / f"rounds/{k:06d}/{name}.jsonl")]
                    for d in (one, two)]
            assert rows[0] and rows[0] == rows[1], f"round {k}: the 2-process {name} differ from one process's"
    # The README: "a 2-process run printed the same first rounds; the seconds vary".
    table = lambda out: [line.split()[:5] for line in out.splitlines()  # noqa: E731
                         if line.split()[:1] in ([str(k)] for k in range(last + 1))]
    printed_one, printed_two = table(r.stdout), table(two_stdout)
    assert len(printed_one) == last + 1 and [row[:4] for row in printed_one] == [row[:4] for row in printed_two]
    assert [float(row[4]) for row in printed_one] == pytest.approx([float(row[4]) for row in printed_two], abs=2e-4)


@pytest.mark.parametrize("micro, loss", [(1, "dpo"), (2, "kto")])   # kto: z0 over both ranks
def test_two_process_training_gives_the_one_process_weights(tiny_model, tmp_path, micro, loss):
    # 7 pairs in steps of 4: the last step splits 2 + 1 (+ 1 weight-0 padding pair).
    rows = [{"prompt": f"Question {i}?", "chosen": "Yes.", "rejected": f"Well, about question {i}, it depends."}
            for i in range(7)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [str(pairs), "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
              "rounds=2", "train.batch_size=4", f"train.micro_batch_size={micro}", "train.learning_rate=1e-3", f"train.loss={loss}"]
    r = oaif_main("offline", *common, "name=one")
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch("offline", *common, "name=two", "train.check_replicas=true")
    assert r.returncode == 0, r.stderr[-4000:]

    weights = lambda name: load_file(tmp_path / name / "checkpoints/round_000001/policy/model.safetensors")  # noqa: E731
    one, two, base = weights("one"), weights("two"), load_file(tiny_model / "model.safetensors")
    moved = max((one[k] - base[k]).abs().max().item() for k in base)
    differ = max((one[k] - two[k]).abs().max().item() for k in one)
    assert moved > 1e-3, "training should move the weights (else the comparison is vacuous)"
    assert differ < 1e-4, f"2-process weights differ from 1-process by {differ:.2e} (moved {moved:.2e})"
    m_one, m_two = read_jsonl(tmp_path / "one/metrics.jsonl"), read_jsonl(tmp_path / "two/metrics.jsonl")
    assert [m["train/steps"] for m in m_two] == [m["train/steps"] for m in m_one] == [4, 8]
    for a, b in zip(m_one, m_two):   # metrics are reduced over ranks: the same as one process's
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-4)
        assert b["train/reward_accuracy"] == pytest.approx(a["train/reward_accuracy"], abs=1e-6)


def test_a_second_sigint_stops_every_rank_at_once_and_the_server_goes_with_them(tiny_model, tmp_path):
    """Ctrl-C twice: the first asks for a stop after the round, the second stops at once. Each
    rank exits 130 without finishing its round (no checkpoint), and the vLLM server rank 0
    started goes with them. The signals go to the ranks themselves, twice, as a terminal sends
    each press to all of them (a launcher that also forwards a signal would make the first
    press count twice and hide the graceful stop this test waits for)."""
    import os
    import signal
    from pathlib import Path

    marked = MarkedProcesses("OAIF_SIGINT_TEST")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_ddp_2proc.yaml"), "-m", "oaif.cli", "run", "configs/tiny_cpu.yaml",
           f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=r", "rounds=40", "train.checkpoint_every=0",
           "prompts_per_round=32", "generate.enforce_eager=true"]   # rounds long enough to stop one mid-way
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**marked.env, "PYTHONUNBUFFERED": "1"})

    def ranks() -> list[int]:   # the launcher's children that run oaif
        return [pid for pid in marked.pids() if pid != proc.pid and b"oaif.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
                and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(proc.pid)]

    try:
        seen = []
        assert read_until(proc, seen, round_row(0)), "".join(seen)[-3000:]   # round 0's row, then the first press
        first = ranks()
        assert len(first) == 2 and len(marked.pids()) > 3, marked.pids()   # launcher, 2 ranks, the server
        for pid in first:
            os.kill(pid, signal.SIGINT)
        # Both ranks took it (a second press before that would count once), then the second.
        if read_until(proc, seen, lambda line: "".join(seen).count("SIGINT: finishing this round") == 2):
            for pid in first:
                os.kill(pid, signal.SIGINT)
        out = "".join(seen) + proc.communicate(timeout=300)[0]
        assert out.count("oaif: stopped at once; the last checkpoint is where `oaif resume` continues") == 2, out[-3000:]
        assert "checkpoint written" not in out and not (tmp_path / "r/checkpoints").exists()
        assert read_jsonl(tmp_path / "r/metrics.jsonl")[-1]["round"] == 0   # the round in flight never finished
        assert marked.gone_within(30), marked.pids()   # no rank, no server left
    finally:   # a failed check must not leave the launch and its server running
        marked.kill()
        proc.wait()


@pytest.mark.parametrize("launch_type, overrides, message", [
    ("MULTI_CPU", ["annotate.backend=vllm"], "the 'vllm' judge is an in-process engine"),
    ("MULTI_CPU", ["eval.every=2"], "in-loop evaluation runs in one process"),
    ("MULTI_CPU", ["train.lora.enabled=true", "train.lora.sync=vllm_lora"], "'vllm_lora' needs the in-process engine"),
    ("FSDP", ["train.lora.enabled=true"], "LoRA runs under DDP only (this launch is FSDP)"),
    ("DEEPSPEED", ["train.check_replicas=true"], "only DDP keeps whole replicas"),
    ("MULTI_CPU", ["train.compile=true"], "train.compile: compiles the single-process trainer only"),
    ("DEEPSPEED", ["train.batch_size=16", "train.micro_batch_size=4"], "set it to at least batch_size / processes = 8"),
])
def test_settings_a_launch_cannot_run_are_refused_before_it_starts(launch_type, overrides, message):
    """The refusals of check_distributed. The launch is described by the two fields the check
    reads: a real launch per case would take ~15 s each (tests/test_fsdp.py launches FSDP)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from oaif.config import ConfigError, load_config
    from oaif.distributed import check_distributed

    launch = SimpleNamespace(distributed_type=DistributedType[launch_type], num_processes=2)
    with pytest.raises(ConfigError) as e:
        check_distributed(load_config(ROOT / "configs/tiny_cpu.yaml", overrides), launch)
    assert message in str(e.value)
    check_distributed(load_config(ROOT / "configs/tiny_cpu.yaml"), launch)   # the plain config is fine


REPLICA_SCRIPT = """
import os, sys, types
import torch
from accelerate import Accelerator
from oaif.config import RunStopped
from oaif.train import PreferenceTrainer
from oaif.models import load_causal_lm

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
policy = load_causal_lm(sys.argv[1], "float32", trainable=True)
trainer = types.SimpleNamespace(policy=policy, accelerator=accelerator, replica_hashes=[], steps=1)
PreferenceTrainer.check_replicas(trainer)               # step 1, equal replicas: recorded, no stop
print(f"rank {rank} equal {trainer.replica_hashes}", flush=True)
if rank == 1:
    with torch.no_grad():
        next(policy.parameters()).view(-1)[0] += 1e-6   # one weight on one rank, as a lost all-reduce would leave
trainer.steps = 2
try:
    PreferenceTrainer.check_replicas(trainer)
    print(f"rank {rank} went on", flush=True)
except RunStopped as e:
    print(f"rank {rank} stopped: {e}", flush=True)
accelerator.end_training()
# Out without the interpreter's teardown: on a loaded machine, gloo's threads were once torn down
# in an order that aborted rank 0 ("terminate called without an active exception") after its
# work was done and printed; what this script checks is all above.
os._exit(0)
"""


def test_replicas_that_drift_apart_stop_every_rank(tiny_model, tmp_path):
    """check_replicas gathers every rank's parameter hash over a real 2-process gloo group:
    equal replicas are recorded and go on; then, in the same launch, replicas that differ stop
    every rank. DDP cannot be made to lose an all-reduce on demand, so rank 1 changes one
    weight by 1e-6 itself."""
    script = tmp_path / "replicas.py"
    script.write_text(REPLICA_SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_ddp_2proc.yaml"), str(script), str(tiny_model)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(" equal [(1, [") == 2 and "went on" not in r.stdout, r.stdout
    assert r.stdout.count("stopped: train.check_replicas: the ranks' parameters differ after optimizer step 2") == 2
    assert "oaif resume" in r.stdout
