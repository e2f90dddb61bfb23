"""The run directory: made whole, rewound for a resume, and each round's metrics line and
checkpoint written in an order a crash cannot break (layout in the README).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import os
import re
import shutil
from pathlib import Path

import torch

from oaif.annotate.judge import Judged
from oaif.checkpoint import (CHECKPOINT_NAME, incomplete_reason, latest_checkpoint, read_trainer_state,
                             save_checkpoint)
from oaif.config import ConfigError, RunConfig, dump_config, load_config
from oaif.distributed import gathered_optimizer_state, gathered_state_dict, on_main
from oaif.faults import crash_point
from oaif.fingerprint import content_fingerprint, model_fingerprint
from oaif.records import Prompt, Sample, append_jsonl, as_prompts, read_jsonl, write_jsonl
from oaif.tracking import markdown_table


class RunDirExists(FileExistsError):
    pass


class RunDirInUse(FileExistsError):
    pass


LOCK = ".oaif.lock"
STAGED = {"rounds", "config.yaml", "config.yaml.tmp", "prompts.jsonl", "prompts.jsonl.tmp", LOCK}
# What a rewind may drop: the round folders, checkpoints and in-loop evaluations it wrote
# (".tmp": a write cut short). Anything else there is left as it is.
ROUND_DIR = re.compile(r"(\d{6})")
EVAL_FILE = re.compile(r"(?:round|live)_(\d{6})\.jsonl(?:\.tmp)?")   # a full evaluation's records, or a live one's
ADAPTER_DIR = re.compile(r"v(\d{6})")
IDENTITY_KEYS = ("prompts_column", "prompts_split", "prompts_per_round", "seed", "generate.samples_per_prompt")


def is_run_dir(path: Path) -> bool:
    """A folder oaif made for a run: its resolved config and its rounds folder."""
    return (path / "config.yaml").is_file() and (path / "rounds").is_dir()


class RunLock:
    """A run directory held by this process: a second `oaif run` (with overwrite) or `oaif
    resume` of it is refused while this one lives. flock, so the kernel lets go when the
    process ends, even by SIGKILL: a crashed run never leaves its directory locked."""

    def __init__(self, run_dir: Path):
        self.fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 32).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise RunDirInUse(f"{run_dir} is in use by another oaif process (pid {holder}): wait for it to end "
                              f"or stop it (Ctrl-C stops it after the round in flight), then try again") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing the last descriptor releases the flock
            self.fd = None


def prepare_run_dir(cfg: RunConfig, prompts: list[Prompt] | None = None) -> tuple[Path, RunLock]:
    """A new run directory, made whole and locked: built under a hidden name, then renamed,
    so a crash leaves either no run directory or one that `oaif resume` takes. prompts: a
    prompt set given in code, saved as prompts.jsonl (cfg.prompts names it)."""
    run_dir = Path(cfg.output_dir) / cfg.name
    if run_dir.exists() or run_dir.is_symlink():
        if not cfg.overwrite:
            raise RunDirExists(f"run directory {run_dir} exists: pass name=<new name> or overwrite=true "
                               f"(or continue it: oaif resume {run_dir})")
        if not is_run_dir(run_dir) or run_dir.is_symlink():
            # overwrite replaces an earlier run, never a folder (or link) oaif did not make.
            raise RunDirExists(f"{run_dir} exists and is not an oaif run directory (no config.yaml and rounds/): "
                               f"overwrite=true only replaces runs; pick another name or output_dir")
        RunLock(run_dir).release()   # a live run is never deleted under its process
        shutil.rmtree(run_dir)
    staging = run_dir.with_name(f".{cfg.name}.new")
    if staging.is_dir() and not staging.is_symlink() and {p.name for p in staging.iterdir()} <= STAGED:
        shutil.rmtree(staging)   # an earlier attempt cut short here (only what this function makes)
    (staging / "rounds").mkdir(parents=True)
    lock = RunLock(staging)      # the lock follows the folder through the rename
    if prompts is not None:
        write_jsonl(staging / "prompts.jsonl", prompts)
    save_config(cfg, staging)
    staging.rename(run_dir)
    return run_dir, lock


def save_config(cfg: RunConfig, run_dir: Path) -> None:
    """The run's config.yaml. Never with overwrite=true: running a run's own saved config
    again must not delete that run."""
    dump_config(dataclasses.replace(cfg, overwrite=False), run_dir / "config.yaml")


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
    for key in ("policy.model", "prompts") + IDENTITY_KEYS:
        old, new = (functools.reduce(getattr, key.split("."), c) for c in (saved, cfg))
        if old != new:
            raise ConfigError(f"{key}: a resumed run keeps its {key} ({old!r}, not {new!r}); start a new "
                              f"run to change it: oaif run {run_dir}/config.yaml name=NEW {key}={new}")
    # The folder may have been moved since: it is the run directory, whatever the saved paths
    # say (a prompt set given in code was saved in it).
    moved = {"prompts": str(run_dir / "prompts.jsonl")} \
        if Path(cfg.prompts) == Path(saved.output_dir) / saved.name / "prompts.jsonl" else {}
    return dataclasses.replace(cfg, name=run_dir.name, output_dir=str(run_dir.parent), overwrite=False, **moved)


def run_identity(cfg: RunConfig, data: str | None = None) -> dict:
    """What the run is, saved in every checkpoint and checked on resume: the settings that
    fix its prompt stream, and fingerprints of what its start model and prompt (or, offline,
    pair) file hold, so a hand-edited config.yaml or a replaced file cannot pass unnoticed."""
    return {**{key: functools.reduce(getattr, key.split("."), cfg) for key in IDENTITY_KEYS},
            "policy.model": model_fingerprint(cfg.policy.model),
            "prompts": content_fingerprint(data or cfg.prompts)}


def check_identity(state: dict, identity: dict, checkpoint: Path) -> None:
    """A resume continues the same run: refuse one whose settings or files changed since
    the checkpoint (written before identities were saved: not checked)."""
    saved = state.get("identity")
    for key, value in identity.items():
        if saved is not None and key in saved and saved[key] != value:
            what = "what the file holds" if key in ("policy.model", "prompts") else "its value"
            raise ConfigError(f"{key}: {what} changed since {checkpoint} was written ({saved[key]!r}, now "
                              f"{value!r}); a resumed run must be the same run: put it back, or start a new run")


def check_checkpoint(run_dir: Path, checkpoint: Path) -> None:
    """`oaif resume --checkpoint`: one of this run's own whole checkpoints, checked before
    anything recorded after it is dropped."""
    if checkpoint.resolve().parent != (run_dir / "checkpoints").resolve() \
            or not CHECKPOINT_NAME.fullmatch(checkpoint.name) or checkpoint.name.endswith(".tmp"):
        raise ConfigError(f"--checkpoint {checkpoint}: not a checkpoint of {run_dir}; pass one of "
                          f"{run_dir / 'checkpoints'}/round_XXXXXX")
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such checkpoint")
    if (why := incomplete_reason(checkpoint)) is not None:
        raise ConfigError(f"--checkpoint {checkpoint}: not whole ({why}); pick an earlier one")


class RunComplete(ConfigError):
    """A resume of a run whose rounds are all done; redone: its end-of-run export, cut short
    by a crash, was written again (the resume then ends without an error)."""
    redone = False


def start_resume(cfg: RunConfig, run_dir: Path, checkpoint: Path | None, identity: dict, accelerator, log
                 ) -> tuple[Path | None, dict | None]:
    """Resume, shared by `oaif resume` of online and offline runs: the checkpoint (given, or
    the newest whole one) is checked against the run and the config, and everything recorded
    after it is dropped; returns (checkpoint, its trainer state), (None, None) when the run
    stopped before its first checkpoint (it starts again at round 0)."""
    if checkpoint is not None:
        check_checkpoint(run_dir, checkpoint)
    else:
        checkpoint = latest_checkpoint(run_dir, log)
    state = read_trainer_state(checkpoint) if checkpoint else None
    if state:
        check_identity(state, identity, checkpoint)
    done = state["round"] if state else -1
    if done + 1 >= cfg.rounds:
        raise RunComplete(f"{run_dir}: rounds 0-{done} are done ({checkpoint.name}); "
                          f"pass rounds=N with N > {done + 1} to continue")
    is_adapter = checkpoint is not None and (checkpoint / "policy/adapter_config.json").is_file()
    if checkpoint is not None and is_adapter != cfg.train.lora.enabled:
        raise ConfigError(f"{checkpoint}: holds {'a LoRA adapter' if is_adapter else 'full weights'} but "
                          f"train.lora.enabled is {cfg.train.lora.enabled}")
    version = state["policy_version"] if state else 0
    dropped, foreign = on_main(accelerator, lambda: rewind_run_dir(cfg, run_dir, done, version))
    log((f"resuming {run_dir} after round {done} from {checkpoint}" if checkpoint else
         f"resuming {run_dir} from round 0 (it stopped before its first checkpoint)")
        + (f"; dropped what came later: {', '.join(dropped)}" if dropped else ""))
    if foreign:
        log(f"  left as they are (not written by oaif): {', '.join(foreign)}")
    return checkpoint, state


def rewind_run_dir(cfg: RunConfig, run_dir: Path, last_round: int, policy_version: int | None = None
                   ) -> tuple[list[str], list[str]]:
    """Drop everything recorded after `last_round` (it is redone), then save the resumed
    config; returns (what was dropped, what was left because oaif did not write it). Every
    file is read before anything changes, so a bad one stops the resume with nothing done;
    safe to repeat if the resume itself is interrupted. policy_version: the checkpoint's (the
    vllm_lora adapters of later versions go too)."""
    rewrite, drop, foreign = {}, [], []
    for name in ("metrics.jsonl", "replicas.jsonl"):
        path = run_dir / name
        if path.is_file():
            rows = read_jsonl(path)
            kept = [r for r in rows if isinstance(r, dict) and isinstance(r.get("round"), int)
                    and r["round"] <= last_round]
            if len(kept) < len(rows):
                rewrite[path] = (kept, f"{len(rows) - len(kept)} lines of {name}")
    limits = [("rounds", ROUND_DIR, last_round), ("checkpoints", CHECKPOINT_NAME, last_round),
              ("eval", EVAL_FILE, last_round)]
    if policy_version is not None:
        limits.append(("adapters", ADAPTER_DIR, policy_version))
    for parent, pattern, last in limits:
        for d in sorted((run_dir / parent).glob("*")):
            if parent == "eval" and d.name in ("baseline.jsonl", "baseline.jsonl.tmp", "baseline.json"):
                continue   # the baseline's answers, made once
            m = pattern.fullmatch(d.name)
            if m is None:
                foreign.append(f"{parent}/{d.name}")
            elif int(m.group(1)) > last:
                drop.append(d)
    dropped = []
    for path, (kept, what) in rewrite.items():
        write_jsonl(path, kept)
        dropped.append(what)
    for d in drop:
        shutil.rmtree(d) if d.is_dir() and not d.is_symlink() else d.unlink()
        dropped.append(str(d.relative_to(run_dir)))
    save_config(cfg, run_dir)
    return dropped, foreign


class RunDir:
    """The run directory as one rank sees it, and its only writer during a run: made whole
    or taken up for a resume (`open`, then `rewind`), locked while the run lives,
    and written in an order a crash cannot break: a round's records as each stage ends, then
    its metrics line, then (when due) its checkpoint. Rank 0 writes; every rank calls (the
    weights of a checkpoint may have to be gathered from shards)."""

    def __init__(self, path: Path, accelerator=None, *, resume: bool = False, checkpoint: Path | None = None,
                 prompts: list[Prompt] | None = None):
        """resume: `path` is a run to continue from `checkpoint` (None: its latest); else a new
        run's, made by open(). prompts: a prompt set given in code, saved with a new run."""
        self.path, self.accelerator, self.resume = path, accelerator, resume
        self.resume_from = checkpoint if resume else None
        self.prompts, self.given = prompts, prompts is not None   # the run's prompt set
        self.lock: RunLock | None = None
        self.identity: dict = {}   # what the run is (run_identity), kept in every checkpoint
        self.tokenizer = None      # the policy's, saved with it in every checkpoint
        self.memory_gib: float | None = None   # the run's estimated memory need (oaif/memory.py)

    @classmethod
    def planned(cls, cfg: RunConfig, resume_dir: Path | None, checkpoint: Path | None, prompts
                ) -> tuple[RunConfig, "RunDir"]:
        """The run directory a Loop will open: a new one for cfg, or resume_dir's. prompts: a
        prompt set given in code (strings, message lists or rows), saved with a new run, whose
        config then names the saved copy so that a resume finds it."""
        given = as_prompts(prompts) if prompts is not None else None
        if given is not None and resume_dir is None:
            cfg = dataclasses.replace(cfg, prompts=str(Path(cfg.output_dir) / cfg.name / "prompts.jsonl"),
                                      prompts_column="", prompts_split="train")
        return cfg, cls(resume_dir or Path(cfg.output_dir) / cfg.name, resume=resume_dir is not None,
                        checkpoint=checkpoint, prompts=given)

    def open(self, cfg: RunConfig, files: dict[str, list] | None = None) -> None:
        """Rank 0 makes a new run's directory whole (prepare_run_dir) and writes `files` (name ->
        rows) in it, or locks the run to resume; every rank goes on once that is done."""
        def make() -> None:   # the lock stays on rank 0 (on_main hands only results to the others)
            if self.resume:
                self.lock = RunLock(self.path)
                return
            self.path, self.lock = prepare_run_dir(cfg, self.prompts if self.given else None)
            for name, rows in (files or {}).items():
                write_jsonl(self.path / name, rows)

        on_main(self.accelerator, make)

    @property
    def main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def rewind(self, cfg: RunConfig, log) -> dict | None:
        """start_resume: drops what came after the checkpoint (now `resume_from`: the given one or
        the latest whole one) and returns its trainer state."""
        self.resume_from, state = start_resume(cfg, self.path, self.resume_from, self.identity, self.accelerator, log)
        return state

    def samples(self, index: int, samples: list[Sample]) -> None:
        """Round `index`'s samples, as soon as they are drawn (rank 0)."""
        write_jsonl(self.path / "rounds" / f"{index:06d}" / "samples.jsonl", samples)
        crash_point("generate")

    def judged(self, index: int, judged: Judged, rankings: list, table: list[list[str]]) -> None:
        """Round `index`'s judgments, then the pairs it keeps, its rankings and the table of
        its first judged pairs (samples.md), as soon as they are judged (rank 0)."""
        out = self.path / "rounds" / f"{index:06d}"
        write_jsonl(out / "judgments.jsonl", judged.judgments)
        crash_point("annotate")
        write_jsonl(out / "pairs.jsonl", judged.pairs)
        if rankings:
            write_jsonl(out / "rankings.jsonl", rankings)
        (out / "samples.md").write_text(markdown_table(table))

    def proxy_rows(self, index: int, rows: dict) -> None:
        """Round `index`'s judged pairs as annotate.select's proxy saw them (features, soft
        labels), after its judgments: a resume refits the same proxy from these (rank 0)."""
        path = self.path / "rounds" / f"{index:06d}" / "proxy.pt"
        torch.save(rows, path.with_suffix(".pt.tmp"))
        path.with_suffix(".pt.tmp").replace(path)   # whole or absent

    def alarms(self, index: int, trips: list[dict]) -> None:
        """Round `index`'s tripped alarms (rank 0), in its folder, added to those read before
        it was trained on: a resume that redoes the round drops them with it."""
        path = self.path / "rounds" / f"{index:06d}" / "alarms.jsonl"
        write_jsonl(path, (read_jsonl(path) if path.is_file() else []) + trips)

    def metrics_rows(self) -> list[dict]:
        """The metrics.jsonl rows written so far (rank 0)."""
        path = self.path / "metrics.jsonl"
        return read_jsonl(path) if path.is_file() else []

    def finish(self, cfg: RunConfig, index: int, trainer, metrics: dict, last: bool, extra=dict) -> bool:
        """metrics.jsonl and replicas.jsonl, then the checkpoint when due (returns whether it
        was). extra: a function giving what else the checkpoint keeps, called only when one is written."""
        def write() -> None:
            append_jsonl(self.path / "metrics.jsonl", metrics)
            for step, hashes in trainer.replica_hashes:
                append_jsonl(self.path / "replicas.jsonl", {"round": index, "step": step, "hashes": hashes})
            crash_point("metrics")

        # Records before the checkpoint: a crash between them leaves rows that the resume from the
        # previous checkpoint drops, never a checkpoint whose round has no metrics.
        on_main(self.accelerator, write)
        trainer.replica_hashes.clear()
        due = last or bool(cfg.train.checkpoint_every and (index + 1) % cfg.train.checkpoint_every == 0)
        if due:
            self.checkpoint(index, trainer, extra())
        return due

    def checkpoint(self, index: int, trainer, extra: dict) -> None:
        """A checkpoint after round `index` now (of the policy at trainer.version), with the
        run's identity. Older vllm_lora adapters go once it is whole: a resume starts from its
        weights."""
        state = gathered_state_dict(self.accelerator, trainer.model)
        optimizer_state = gathered_optimizer_state(self.accelerator, trainer.model, trainer.optimizer)
        keep, policy_version = trainer.cfg.keep_checkpoints, trainer.version

        def save() -> None:
            save_checkpoint(self.path, index, policy_version, trainer, self.tokenizer, state, keep,
                            {"identity": self.identity, **extra}, optimizer_state)
            for d in sorted((self.path / "adapters").glob("v??????")):
                if ADAPTER_DIR.fullmatch(d.name) and int(d.name[1:]) < policy_version:
                    shutil.rmtree(d)

        on_main(self.accelerator, save)

    def close(self) -> None:
        """Last: nothing of this process touches the run directory after it."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def is_offline_run(run_dir: Path) -> bool:
    """`oaif offline` keeps the pairs it trains on in the run directory itself."""
    return (run_dir / "pairs.jsonl").is_file()


def export_stale(run_dir: Path) -> bool:
    """The end-of-run export is missing, or older than the last metrics line (cut short)."""
    dataset, metrics = run_dir / "dataset", run_dir / "metrics.jsonl"
    return not dataset.is_dir() or (metrics.is_file() and dataset.stat().st_mtime < metrics.stat().st_mtime)
