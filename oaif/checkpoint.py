"""Checkpoints: the policy (full weights, or only the LoRA adapter), the optimizer, the
round and policy version, the RNG states and the run's identity, saved so that a crash or a
power cut leaves either the whole checkpoint or none (files fsynced, complete.json last, then
a rename); the newest whole one is used, falling back past one that is not.

    runs/NAME/checkpoints/round_000009/{policy/, trainer.pt, complete.json}

`oaif export CHECKPOINT --out DIR` turns one into a plain Hugging Face model (a LoRA
adapter merged into its base), loadable by from_pretrained and vLLM. `oaif resume RUN_DIR`
continues a run from its latest checkpoint (loop.py).
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import sys
from pathlib import Path

import torch

from oaif import outputs
from oaif.annotate.ranking import max_pairs_per_prompt
from oaif.config import RunConfig
from oaif.distributed import fsdp, load_optimizer_state, sharded
from oaif.faults import crash_point
from oaif.records import fsync_path
from oaif.train import PreferenceTrainer, build_policy, lr_lambda
from oaif.models import load_causal_lm


COMPLETE = "complete.json"   # written last: the files of the checkpoint and their sizes
CHECKPOINT_NAME = re.compile(r"round_(\d{6})(?:\.tmp)?")   # group 1: the round


def save_checkpoint(run_dir: Path, round: int, policy_version: int, trainer, tokenizer,
                    state_dict: dict | None = None, keep: int = 0, extra: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """state_dict: the gathered weights of a multi-process run (FSDP, ZeRO-3 shard them).
    optimizer_state: an FSDP run's gathered optimizer state (distributed.gathered_optimizer_state).
    keep: once this one is whole, delete all but the newest `keep` checkpoints (0: none).
    extra: more plain data for trainer.pt (the run's identity, async rounds' drawn samples).

    Survives a power cut: every file is written under round_N.tmp and fsynced, then
    complete.json (each file's size) is written and fsynced, then the folder is renamed and
    its parent fsynced. A folder without a matching complete.json is never used."""
    final = run_dir / "checkpoints" / f"round_{round:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.policy.save_pretrained(tmp / "policy", state_dict=state_dict)   # peft: the adapter only (small)
    tokenizer.save_pretrained(tmp / "policy")
    crash_point("checkpoint")
    # Sharded, rank 0's own optimizer state is one shard of it: FSDP's is saved gathered, whole;
    # DeepSpeed's is not saved, and a resume starts AdamW's moments afresh (restore_trainer says so).
    optimizer = optimizer_state if sharded(trainer.accelerator) else trainer.optimizer.state_dict()
    torch.save({"round": round, "policy_version": policy_version, "steps": trainer.steps,
                "optimizer": optimizer, "scheduler": trainer.scheduler.state_dict(),
                "schedule": {"total_steps": trainer.total_steps, "anchor": trainer.anchor},
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), **(extra or {})},
               tmp / "trainer.pt")
    files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    for f in files:
        fsync_path(tmp / f)
    (tmp / COMPLETE).write_text(json.dumps({"round": round, "files": files}))
    fsync_path(tmp / COMPLETE)
    for d in {tmp} | {(tmp / f).parent for f in files}:
        fsync_path(d)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_path(final.parent)
    crash_point("prune")
    if keep:
        older = [p for p in complete_checkpoints(run_dir) if p.name < final.name]
        for old in older[:-(keep - 1) or None]:
            shutil.rmtree(old)
    return final


def export_merged(checkpoint: Path, out: Path, base_model: str, dtype: str, overwrite: bool = False) -> Path:
    """A checkpoint as a plain HF model: full weights copied, or adapter merged into base.
    `out` is a new folder, or with overwrite an earlier oaif model (oaif/outputs.py)."""
    from transformers import AutoTokenizer

    policy_dir = checkpoint / "policy"
    if not policy_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no policy/ folder; is this a checkpoint directory?")
    outputs.check(out, "model", folder=True, overwrite=overwrite)   # before the model loads
    # 'auto' is the precision this machine computes in; an exported model is read on others,
    # so it keeps the trained weights' float32.
    dtype = "float32" if dtype == "auto" else dtype
    if (policy_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_causal_lm(base_model, dtype, trainable=False), policy_dir)
        model = model.merge_and_unload()
    else:
        model = load_causal_lm(str(policy_dir), dtype, trainable=False)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)

    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return outputs.write_folder(out, "model", fill, overwrite=overwrite)


def incomplete_reason(checkpoint: Path) -> str | None:
    """Why a checkpoint folder cannot be used (None: it is whole). One written before
    complete.json existed counts as whole when it has both its parts."""
    marker = checkpoint / COMPLETE
    if not marker.is_file():
        if (checkpoint / "trainer.pt").is_file() and (checkpoint / "policy").is_dir() \
                and not checkpoint.name.endswith(".tmp"):
            return None
        return "its save was cut short (no complete.json)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "its complete.json is unreadable"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or not the size it was written at"
    return None


def complete_checkpoints(run_dir: Path, log=None) -> list[Path]:
    """The run's whole checkpoints, oldest first. A folder that is not whole (a save cut
    short, a power cut before the disk had it all) is named through `log` and skipped."""
    found = []
    for p in sorted((run_dir / "checkpoints").glob("round_??????*")):
        if not CHECKPOINT_NAME.fullmatch(p.name):
            continue
        why = incomplete_reason(p)
        if why is None:
            found.append(p)
        elif log is not None and not p.name.endswith(".tmp"):
            log(f"skipping checkpoint {p}: {why}")
    return found


def latest_checkpoint(run_dir: Path, log=None) -> Path | None:
    """The newest whole checkpoint, falling back past any that is not; None when the run
    stopped before its first."""
    done = complete_checkpoints(run_dir, log)
    return done[-1] if done else None


def read_trainer_state(checkpoint: Path) -> dict:
    path = checkpoint / "trainer.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: no trainer.pt; is this a checkpoint directory?")
    import pickle

    # Optimizer state and RNG states: tensors, numbers, strings, tuples, lists, dicts. Nothing
    # else is unpickled (weights_only), so a checkpoint from elsewhere cannot run code here.
    # Memory-mapped: a resume reads it three times (round and schedule, policy version, the
    # trainer's state), a 7B run's is large.
    try:
        return torch.load(path, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        # torch's message names the object amid advice to trust the file: the name is kept.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        refused = next((line for line in lines if "unsupported" in line.lower()), lines[-1]).split(". Please")[0]
        raise ValueError(f"{path}: refused: it holds more than tensors and plain data, which an oaif checkpoint "
                         f"never does, and loading it could run code ({refused})") from None


def schedule_anchor(cfg, state: dict, total_steps: int) -> tuple[int, float] | None:
    """The anchor (step, scale) of lr_lambda for a run resumed with `total_steps` (more
    rounds: a longer horizon) from a checkpoint's trainer state."""
    saved = state.get("schedule", {"total_steps": total_steps, "anchor": None})
    anchor = saved["anchor"] and tuple(saved["anchor"])
    if saved["total_steps"] == total_steps:
        return anchor
    at = max(state["steps"], cfg.warmup_steps)
    return at, lr_lambda(cfg, saved["total_steps"], anchor)(at)


def restore_trainer(trainer, state: dict) -> None:
    """Optimizer, schedule position, step count and RNG states as they were saved. A run
    resumed with more rounds (a longer schedule) continues its learning rate from where it
    was, decaying to 0 over the new length, instead of jumping up."""
    if fsdp(trainer.accelerator) and state["optimizer"] is not None:
        load_optimizer_state(trainer.model, trainer.optimizer, state["optimizer"])
    elif state["optimizer"] is None or sharded(trainer.accelerator):
        print("oaif: no optimizer state to restore (a DeepSpeed run's is not checkpointed): AdamW's moments start "
              "afresh (weights, schedule position and RNG are restored)", file=sys.stderr)
    else:
        trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.steps, trainer.version = state["steps"], state["policy_version"]
    trainer.anchor = schedule_anchor(trainer.cfg, state, trainer.total_steps)
    # The anchored schedule gives the saved step the saved rate: the optimizer's lr stays as loaded.
    trainer.scheduler.lr_lambdas[0] = lr_lambda(trainer.cfg, trainer.total_steps, trainer.anchor)
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])


def build_trainer(cfg: RunConfig, pad_id: int, total_steps: int, accelerator=None,
                  resume_from: Path | None = None) -> PreferenceTrainer:
    """The config's policy, reference and trainer: shared by `oaif run` and `oaif offline`.
    resume_from: a checkpoint to continue from (its weights and trainer state)."""
    torch.manual_seed(cfg.seed)   # the same on every rank: LoRA adapters start identical
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = str(accelerator.device) if accelerator is not None else cfg.policy.device
    policy, reference = build_policy(cfg.policy.model, cfg.policy.dtype, device, cfg.train,
                                     str(resume_from / "policy") if resume_from else None)
    trainer = PreferenceTrainer(policy, reference, cfg.train, pad_id, total_steps, accelerator, cfg.policy.dtype)
    if resume_from:
        restore_trainer(trainer, read_trainer_state(resume_from))
    return trainer


def schedule_steps(cfg: RunConfig) -> int:
    """The learning-rate schedule's horizon: the most optimizer steps the run can take (every pair kept)."""
    a = cfg.annotate
    per_prompt = max_pairs_per_prompt(cfg.generate.samples_per_prompt, a.ranking, a.pairs) if a.select.rule == "random" \
        else a.select.comparisons_per_prompt
    pairs_per_round = cfg.prompts_per_round * per_prompt
    return cfg.rounds * cfg.train.epochs_per_round * math.ceil(pairs_per_round / cfg.train.batch_size)
