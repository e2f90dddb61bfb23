"""The run directory: made whole, rewound for a resume, and each round's metrics line and
checkpoint written in an order a crash cannot break (layout in the README).
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from pathlib import Path

from oaif.config import ConfigError, RunConfig, dump_config, load_config
from oaif.faults import crash_point
from oaif.records import Prompt, append_jsonl, read_jsonl, write_jsonl


class RunDirExists(FileExistsError):
    pass


def is_run_dir(path: Path) -> bool:
    """A folder oaif made for a run: its resolved config and its rounds folder."""
    return (path / "config.yaml").is_file() and (path / "rounds").is_dir()


def prepare_run_dir(cfg: RunConfig, prompts: list[Prompt] | None = None) -> Path:
    """A new run directory, made whole: built under a hidden name, then renamed, so a crash
    leaves either no run directory or one that `oaif resume` takes. prompts: a prompt set
    given in code, saved as prompts.jsonl (cfg.prompts names it)."""
    run_dir = Path(cfg.output_dir) / cfg.name
    if run_dir.exists():
        if not cfg.overwrite:
            raise RunDirExists(f"run directory {run_dir} exists: pass name=<new name> or overwrite=true")
        if not is_run_dir(run_dir) or run_dir.is_symlink():
            # overwrite replaces an earlier run, never a folder (or link) oaif did not make.
            raise RunDirExists(f"{run_dir} exists and is not an oaif run directory (no config.yaml and rounds/): "
                               f"overwrite=true only replaces runs; pick another name or output_dir")
        shutil.rmtree(run_dir)
    staging = run_dir.with_name(f".{cfg.name}.new")
    made = {"rounds", "config.yaml", "prompts.jsonl", "prompts.jsonl.tmp"}
    if staging.is_dir() and not staging.is_symlink() and {p.name for p in staging.iterdir()} <= made:
        shutil.rmtree(staging)   # an earlier attempt cut short here (only what this function makes)
    (staging / "rounds").mkdir(parents=True)
    if prompts is not None:
        write_jsonl(staging / "prompts.jsonl", prompts)
    dump_config(cfg, staging / "config.yaml")
    staging.rename(run_dir)
    return run_dir


def resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The run's saved config with `overrides`, refusing changes to what the run *is*."""
    fixed = [o for o in overrides if o.split("=", 1)[0].strip() in ("name", "output_dir")]
    if fixed:
        raise ConfigError(f"{fixed[0]}: a resumed run stays in {run_dir}; copy the folder to move it")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: no config.yaml; is this a run directory (runs/NAME)?")
    saved = load_config(run_dir / "config.yaml")
    cfg = load_config(run_dir / "config.yaml", overrides)
    # Another start model changes the reference; another prompt set, batch or seed makes the
    # resumed prompt stream skip the wrong prompts.
    for key in ("policy.model", "prompts", "prompts_column", "prompts_split", "prompts_per_round", "seed",
                "generate.samples_per_prompt"):
        old, new = (functools.reduce(getattr, key.split("."), c) for c in (saved, cfg))
        if old != new:
            raise ConfigError(f"{key}: a resumed run keeps its {key} ({old!r}, not {new!r}); start a new "
                              f"run to change it: oaif run {run_dir}/config.yaml name=NEW {key}={new}")
    # The folder may have been moved since: it is the run directory, whatever the saved paths
    # say (a prompt set given in code was saved in it).
    moved = {"prompts": str(run_dir / "prompts.jsonl")} \
        if Path(cfg.prompts) == Path(saved.output_dir) / saved.name / "prompts.jsonl" else {}
    return dataclasses.replace(cfg, name=run_dir.name, output_dir=str(run_dir.parent), **moved)


def rewind_run_dir(cfg: RunConfig, run_dir: Path, last_round: int) -> list[str]:
    """Drop everything recorded after `last_round` (it is redone) and save the resumed
    config; returns what was dropped. Safe to repeat if the resume itself is interrupted."""
    dropped = []
    for name in ("metrics.jsonl", "replicas.jsonl"):
        path = run_dir / name
        if path.is_file():
            rows = read_jsonl(path)
            kept = [r for r in rows if r["round"] <= last_round]
            if len(kept) < len(rows):
                write_jsonl(path, kept)
                dropped.append(f"{len(rows) - len(kept)} lines of {name}")
    for parent, prefix, suffix in (("rounds", "", ""), ("checkpoints", "round_", ""), ("eval", "round_", ".jsonl")):
        for d in sorted((run_dir / parent).glob(prefix + "*")):
            # ".tmp" first: a whole-file write cut short leaves "round_000003.jsonl.tmp".
            if int(d.name.removeprefix(prefix).removesuffix(".tmp").removesuffix(suffix)) > last_round:
                shutil.rmtree(d) if d.is_dir() else d.unlink()
                dropped.append(f"{parent}/{d.name}")
    dump_config(cfg, run_dir / "config.yaml")
    return dropped


def finish_round(cfg: RunConfig, run_dir: Path, trainer, tokenizer, accelerator, index: int, policy_version: int,
                 metrics: dict, last: bool) -> bool:
    """metrics.jsonl and replicas.jsonl, then the checkpoint when due (returns whether it
    was); rank 0 writes."""
    from oaif.distributed import on_main

    def write() -> None:
        append_jsonl(run_dir / "metrics.jsonl", metrics)
        for step, hashes in trainer.replica_hashes:
            append_jsonl(run_dir / "replicas.jsonl", {"round": index, "step": step, "hashes": hashes})
        crash_point("metrics")

    # Records before the checkpoint: a crash between them leaves rows that the resume from the
    # previous checkpoint drops, never a checkpoint whose round has no metrics.
    on_main(accelerator, write)
    trainer.replica_hashes.clear()
    due = last or bool(cfg.train.checkpoint_every and (index + 1) % cfg.train.checkpoint_every == 0)
    if due:
        checkpoint_now(run_dir, trainer, tokenizer, accelerator, index, policy_version)
    return due


def checkpoint_now(run_dir: Path, trainer, tokenizer, accelerator, index: int, policy_version: int) -> None:
    """Every rank calls it (the weights may have to be gathered from shards); rank 0 writes."""
    from oaif.checkpoint import save_checkpoint
    from oaif.distributed import gathered_state_dict, on_main

    state = gathered_state_dict(accelerator, trainer.model)
    keep = trainer.cfg.keep_checkpoints
    on_main(accelerator, lambda: save_checkpoint(run_dir, index, policy_version, trainer, tokenizer, state, keep))
