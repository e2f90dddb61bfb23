"""FSDP2 under `accelerate launch` (2 processes on one CPU, gloo): configs/accelerate/cpu_fsdp_2proc.yaml.

Each rank holds half of every weight, gradient and AdamW moment. Checked: FSDP training takes
the steps DDP takes on the same pairs and seed; a checkpoint holds the gathered weights and the
gathered optimizer state, and a resume from it gives every rank its shard back, so the resumed
run continues exactly as the uninterrupted one; a run through the CLI (rank 0 starts the vLLM
server and loads the gathered weights into it every round) checkpoints and resumes. And,
where deepspeed is installed, ZeRO-2 (configs/accelerate/cpu_zero2_2proc.yaml) takes DDP's steps.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from oaif.records import read_jsonl

from conftest import ROOT, versions_follow_training

# 7 pairs in one optimizer step of 8: rank 0 trains on 4, rank 1 on 3 and a weight-0 copy;
# micro_batch_size 2 makes each rank accumulate over two passes (no_sync on the first).
# One epoch per round: each round's train/loss is one optimizer step's loss.
PAIRS = [{"prompt": f"Question {i}?", "chosen": "Yes.", "rejected": f"Well, about question {i}, it depends."}
         for i in range(7)]
STEP = ["train.batch_size=8", "train.micro_batch_size=2", "train.epochs_per_round=1", "train.learning_rate=1e-3",
        "train.checkpoint_every=1"]
# FSDP and DDP differ only in how the gradients are summed across ranks (reduce-scatter of
# halves vs all-reduce of wholes: fp32 sums in another order, ~1e-7 relative) and AdamW keeps
# an update's size near lr whatever the gradient's: three steps leave the weights ~1e-7 apart
# (measured: 2e-7 after 8 steps). A wrong shard, scale or reduction moves them by ~lr = 1e-3.
TOLERANCE = 1e-5


def launch(config: str, *args: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/CONFIG -m oaif.cli ...`"""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate" / config), "-m", "oaif.cli", *args]
    # DS_ACCELERATOR: DeepSpeed would look for a GPU (the other launches ignore it).
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})


def offline(config: str, tiny_model, out, name: str, *overrides: str) -> list[dict]:
    """3 rounds of `oaif offline` on PAIRS under a launch; its metrics."""
    pairs = out / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    r = launch(config, "offline", str(pairs), "configs/tiny_cpu.yaml", f"policy.model={tiny_model}",
               f"output_dir={out}", f"name={name}", "rounds=3", *STEP, *overrides)
    assert r.returncode == 0, r.stderr[-4000:]
    return read_jsonl(out / name / "metrics.jsonl")


def checkpoint(run, round: int) -> tuple[dict, dict]:
    """A checkpoint's weights and optimizer state."""
    folder = run / f"checkpoints/round_{round:06d}"
    return load_file(folder / "policy/model.safetensors"), torch.load(folder / "trainer.pt", weights_only=True)["optimizer"]


def moments(optimizer: dict) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(exp_avg, exp_avg_sq, step) per parameter, in the optimizer's parameter order (FSDP's
    gathered state names the parameters, a replicated optimizer's numbers them)."""
    return [(s["exp_avg"], s["exp_avg_sq"], float(s["step"]))
            for s in (optimizer["state"][p] for p in optimizer["param_groups"][0]["params"])]


@pytest.fixture(scope="module")
def fsdp_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return out / "fsdp", offline("cpu_fsdp_2proc.yaml", tiny_model, out, "fsdp")


def test_fsdp_takes_the_steps_ddp_takes(fsdp_run, tiny_model, tmp_path):
    run, fsdp_metrics = fsdp_run
    ddp_metrics = offline("cpu_ddp_2proc.yaml", tiny_model, tmp_path, "ddp")
    assert [m["train/steps"] for m in fsdp_metrics] == [m["train/steps"] for m in ddp_metrics] == [1, 2, 3]
    losses = [m["train/loss"] for m in fsdp_metrics]
    assert losses == pytest.approx([m["train/loss"] for m in ddp_metrics], abs=TOLERANCE)
    assert losses[0] - losses[-1] > 0.05, f"training should lower the loss (else the comparison is vacuous): {losses}"

    (fsdp_weights, fsdp_optimizer), (ddp_weights, ddp_optimizer) = checkpoint(run, 2), checkpoint(tmp_path / "ddp", 2)
    base = load_file(tiny_model / "model.safetensors")
    assert set(fsdp_weights) == set(ddp_weights) == set(base)   # whole weights, the model's own names
    assert max((fsdp_weights[k] - base[k]).abs().max().item() for k in base) > 1e-3
    assert max((fsdp_weights[k] - ddp_weights[k]).abs().max().item() for k in base) < TOLERANCE
    # The whole optimizer state: every parameter's moments at their full shape, equal to DDP's
    # (the same parameter order: DDP's numbers are positions in FSDP's list of names).
    names = fsdp_optimizer["param_groups"][0]["params"]
    assert sorted(names) == sorted(base) and len(names) == len(ddp_optimizer["param_groups"][0]["params"])
    for (m, v, step), (dm, dv, dstep), name in zip(moments(fsdp_optimizer), moments(ddp_optimizer), names):
        assert m.shape == dm.shape == base[name].shape and step == dstep == 3
        assert (m - dm).abs().max().item() < TOLERANCE and (v - dv).abs().max().item() < TOLERANCE


def test_a_resumed_fsdp_run_continues_with_the_saved_optimizer_state(fsdp_run, tmp_path):
    """`oaif resume` from round 1's checkpoint redoes round 2 as the uninterrupted run did it:
    the same loss and the same weights and moments after it. AdamW's moments started afresh (or
    one rank given another's shard) would take another step: the first step of a fresh AdamW
    moves every weight by ~lr, a continued one by less."""
    run, metrics = fsdp_run
    again = tmp_path / "again"
    shutil.copytree(run, again)
    r = launch("cpu_fsdp_2proc.yaml", "resume", str(again), "--checkpoint", str(again / "checkpoints/round_000001"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "no optimizer state to restore" not in r.stderr
    resumed = read_jsonl(again / "metrics.jsonl")
    assert [m["round"] for m in resumed] == [0, 1, 2] and resumed[:2] == metrics[:2]
    assert resumed[2]["train/steps"] == 3
    assert resumed[2]["train/loss"] == pytest.approx(metrics[2]["train/loss"], abs=1e-6)
    (weights, optimizer), (first_weights, first_optimizer) = checkpoint(again, 2), checkpoint(run, 2)
    assert max((weights[k] - first_weights[k]).abs().max().item() for k in weights) < 1e-6
    for (m, v, step), (fm, fv, fstep) in zip(moments(optimizer), moments(first_optimizer)):
        assert step == fstep == 3
        assert (m - fm).abs().max().item() < 1e-6 and (v - fv).abs().max().item() < 1e-6


def test_an_fsdp_run_through_the_cli_syncs_checkpoints_and_resumes(tiny_model, tmp_path):
    """The loop under FSDP: rank 0 starts a vLLM server and loads the gathered weights into it
    after every round; `oaif resume` continues the run from its checkpoint."""
    common = [f"output_dir={tmp_path}", "name=r", "prompts_per_round=8", "train.batch_size=4",
              "train.micro_batch_size=1", "generate.enforce_eager=true"]
    r = launch("cpu_fsdp_2proc.yaml", "run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", "rounds=2", *common)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "(2 processes)" in r.stdout and r.stdout.count("run directory") == 1
    run = tmp_path / "r"
    r = launch("cpu_fsdp_2proc.yaml", "resume", str(run), "rounds=3")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resuming" in r.stdout and "after round 1" in r.stdout and "no optimizer state to restore" not in r.stderr
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [0, 1, 2]
    versions_follow_training(metrics, trained_at_least=2)
    steps = [m.get("train/steps") for m in metrics if "train/steps" in m]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)   # the step count goes on, not from 0
    samples = read_jsonl(run / "rounds/000002/samples.jsonl")
    assert samples and all(s["policy_version"] == metrics[1]["policy_version"] for s in samples)
    _, optimizer = checkpoint(run, 2)
    assert moments(optimizer) and all(step == steps[-1] for _, _, step in moments(optimizer))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero2_takes_the_steps_ddp_takes(tiny_model, tmp_path):
    """ZeRO-2 steps the optimizer inside the backward that syncs, so each rank runs one pass per
    step (micro_batch_size 4 for 8 pairs on 2 ranks: check_distributed asks for it)."""
    zero = offline("cpu_zero2_2proc.yaml", tiny_model, tmp_path, "zero", "train.micro_batch_size=4")
    ddp = offline("cpu_ddp_2proc.yaml", tiny_model, tmp_path, "ddp")
    assert [m["train/steps"] for m in zero] == [1, 2, 3]
    assert [m["train/loss"] for m in zero] == pytest.approx([m["train/loss"] for m in ddp], abs=TOLERANCE)
    (weights, optimizer), (ddp_weights, _) = checkpoint(tmp_path / "zero", 2), checkpoint(tmp_path / "ddp", 2)
    assert optimizer is None   # not checkpointed under DeepSpeed
    assert max((weights[k] - ddp_weights[k]).abs().max().item() for k in weights) < TOLERANCE
