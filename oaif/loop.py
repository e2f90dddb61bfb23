"""The OAIF loop: generate → annotate (both orders) → train (online DPO) → sync, per round.

    oaif run configs/tiny_cpu.yaml [key=value ...]
    oaif resume runs/NAME [key=value ...]      (continue from the latest checkpoint)

Each round samples from the policy as it is *now* (the engine holds the weights of the
last sync), so the preference data is always on-policy (OAIF, Guo et al. 2024, Alg. 1).
"""

from __future__ import annotations

import math
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from oaif.annotate.base import Annotator
from oaif.annotate.judge import judge_pairs, judgment_metrics, label_mass_warning
from oaif.annotate.select import build_annotator, check_inputs
from oaif.checkpoint import latest_checkpoint, read_trainer_state, restore_trainer, save_checkpoint, schedule_anchor
from oaif.config import ConfigError, RunConfig, RunStopped, dump_config
from oaif.generate import check_model, load_tokenizer
from oaif.evaluate import TRAINING_JUDGE_WARNING, eval_annotator_config, eval_prompts, format_summary
from oaif.evaluate import max_new_tokens as eval_max_new_tokens
from oaif.faults import crash_point
from oaif.records import Prompt, append_jsonl, load_prompts, read_jsonl, write_jsonl

# (metric, column title, format) of the line printed per round.
COLUMNS = [("round", "round", "d"), ("pairs_kept", "kept", "d"), ("pairs_dropped", "dropped", "d"),
           ("generate/mean_length", "mean_len", ".1f"), ("train/loss", "loss", ".4f"),
           ("train/reward_accuracy", "reward_acc", ".2f"), ("round/seconds", "seconds", ".1f")]


def format_row(metrics: dict) -> str:
    cells = []
    for key, title, fmt in COLUMNS:
        v = metrics.get(key)
        cells.append(f"{format(v, fmt) if v is not None else '-':>{max(len(title), 6)}}")
    return "  ".join(cells)


def header() -> str:
    return "  ".join(f"{title:>{max(len(title), 6)}}" for _, title, _ in COLUMNS)


class RunDirExists(FileExistsError):
    pass


class TooManyInvalid(RunStopped):
    pass


def is_run_dir(path: Path) -> bool:
    """A folder oaif made for a run: its resolved config and its rounds folder."""
    return (path / "config.yaml").is_file() and (path / "rounds").is_dir()


def prepare_run_dir(cfg: RunConfig) -> Path:
    """A new run directory, made whole: built under a hidden name, then renamed, so a crash
    leaves either no run directory or one that `oaif resume` takes."""
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
    if staging.is_dir() and not staging.is_symlink() and {p.name for p in staging.iterdir()} <= {"rounds", "config.yaml"}:
        shutil.rmtree(staging)   # an earlier attempt cut short here (only what this function makes)
    (staging / "rounds").mkdir(parents=True)
    dump_config(cfg, staging / "config.yaml")
    staging.rename(run_dir)
    return run_dir


def round_prompts(prompts: list[Prompt], per_round: int, seed: int):
    """Endless stream of prompt batches: each pass over the set in a new seeded order."""
    rng, queue = random.Random(seed), []
    while True:
        batch = []
        while len(batch) < per_round:
            if not queue:
                queue = prompts[:]
                rng.shuffle(queue)
            batch.append(queue.pop())
        yield batch


@dataclass
class Loop:
    """Everything a round needs, built once by `setup`. Under `accelerate launch` only rank 0
    has a generator and annotator (None elsewhere); every rank has the trainer."""
    cfg: RunConfig
    run_dir: Path
    generator: "Generator | None"
    annotator: Annotator | None
    trainer: "DPOTrainer"
    llm: "vllm.LLM | None"   # the in-process engine; None in server mode
    tokenizer: object
    accelerator: object = None
    server_url: str = ""       # generate.server_url, or the server rank 0 started
    server: object = None      # the server process rank 0 started (stopped by close)
    policy_version: int = 0
    annotator_totals: dict | None = None   # annotator.stats at the end of the last round
    evaluator: "Evaluator | None" = None   # eval.every > 0: the policy against its start, held out

    def evaluate(self, index: int) -> dict:
        """eval/* metrics of the policy the engine holds now (rank 0 of one process)."""
        return self.evaluator(self.generator.engine, self.tokenizer, self.trainer, index, self.policy_version)

    def sync(self) -> float:
        """Make the engine sample from the trainer's current policy; returns seconds.
        Every rank calls it (weights may have to be gathered); rank 0 pushes."""
        from oaif.distributed import gathered_state_dict, on_main
        from oaif.sync import merged_copy, push_lora_adapter, push_weights

        g, policy, lora = self.cfg.generate, self.trainer.policy, self.cfg.train.lora
        crash_point("sync")
        if self.server_url:
            from oaif.server import push_weights_to_server

            state = None if lora.enabled else gathered_state_dict(self.accelerator, self.trainer.model)
            return on_main(self.accelerator, lambda: push_weights_to_server(
                self.server_url, merged_copy(policy), g.server_weights_dir, state_dict=state))
        if lora.enabled and lora.sync == "vllm_lora":
            t0 = time.perf_counter()
            self.generator.engine.lora_request = push_lora_adapter(policy, self.run_dir / "adapters",
                                                                   self.policy_version)
            return time.perf_counter() - t0
        return push_weights(self.llm, policy)

    def collect(self, index: int, prompts: list[Prompt]) -> tuple[list, dict]:
        """Sample, judge both orders, write the round's records; (kept pairs, metrics)."""
        out = self.run_dir / "rounds" / f"{index:06d}"
        groups, metrics = self.generator.sample(prompts, index, self.policy_version)
        write_jsonl(out / "samples.jsonl", [s for g in groups for s in g])
        crash_point("generate")

        pairs = [(g[k], g[k + 1]) for g in groups for k in range(0, len(g) - 1, 2)]
        judged = judge_pairs(self.annotator, pairs, index, self.policy_version,
                             self.cfg.annotate.missing_eos_penalty)
        write_jsonl(out / "judgments.jsonl", judged.judgments)
        crash_point("annotate")
        write_jsonl(out / "pairs.jsonl", judged.pairs)
        metrics |= judgment_metrics(judged.judgments)
        totals, before = dict(self.annotator.stats), self.annotator_totals or {}
        metrics |= {f"annotate/{k}": v - before.get(k, 0) for k, v in totals.items()}  # this round's share
        self.annotator_totals = totals
        return judged.pairs, {"pairs_kept": len(judged.pairs), "pairs_dropped": len(pairs) - len(judged.pairs),
                              **metrics}

    def round(self, index: int, batches) -> dict:
        """One round on every rank: rank 0 collects, all train on the pairs, rank 0 syncs."""
        from oaif.distributed import on_main

        t0 = time.perf_counter()
        pairs, metrics = on_main(self.accelerator, lambda: self.collect(index, next(batches)))
        invalid, ceiling = metrics.get("annotate/invalid_rate"), self.cfg.annotate.max_invalid_rate
        if invalid is not None and invalid > ceiling:   # every rank sees rank 0's metrics and stops alike
            raise TooManyInvalid(
                f"round {index}: {invalid:.0%} of the judged pairs got an invalid judgment (> annotate.max_invalid_rate "
                f"{ceiling:g}), so the round was not trained on; the judge's raw answers are in "
                f"{self.run_dir / 'rounds' / f'{index:06d}' / 'judgments.jsonl'}")
        if pairs:
            metrics |= self.trainer.train_round(pairs)
            self.policy_version += 1
            metrics["sync/seconds"] = self.sync()
        seconds = time.perf_counter() - t0
        return {"round": index, "policy_version": self.policy_version, **metrics,
                "round/seconds": seconds, "round/pairs_per_s": len(pairs) / seconds}

    def close(self) -> None:
        if self.server is not None:
            from oaif.server import stop_server

            stop_server(self.server)


def build_trainer(cfg: RunConfig, pad_id: int, total_steps: int, accelerator=None,
                  resume_from: Path | None = None) -> "DPOTrainer":
    """The config's policy, reference and trainer: shared by `oaif run` and `oaif offline`.
    resume_from: a checkpoint to continue from (its weights and trainer state)."""
    from oaif.train import DPOTrainer, build_policy

    torch.manual_seed(cfg.seed)   # the same on every rank: LoRA adapters start identical
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = str(accelerator.device) if accelerator is not None else cfg.policy.device
    policy, reference = build_policy(cfg.policy.model, cfg.policy.dtype, device, cfg.train,
                                     str(resume_from / "policy") if resume_from else None)
    trainer = DPOTrainer(policy, reference, cfg.train, pad_id, total_steps, accelerator, cfg.policy.dtype)
    if resume_from:
        restore_trainer(trainer, read_trainer_state(resume_from))
    return trainer


def start_local_server(cfg: RunConfig):
    """Rank 0 of a multi-process run: a vLLM server for the policy on a free local port."""
    from oaif.server import start_server

    g = cfg.generate
    extra = ["--tensor-parallel-size", str(g.tensor_parallel_size), "--gpu-memory-utilization",
             str(g.gpu_memory_utilization), *(["--enforce-eager"] if g.enforce_eager else [])]
    proc = start_server(cfg.policy.model, None, cfg.policy.dtype, cfg.seed,
                        cfg.policy.max_prompt_tokens + g.max_new_tokens, g.kv_cache_gib, extra)
    return f"http://127.0.0.1:{proc.port}", proc


def schedule_steps(cfg: RunConfig) -> int:
    """The learning-rate schedule's horizon: the most optimizer steps the run can take (every pair kept)."""
    pairs_per_round = cfg.prompts_per_round * (cfg.generate.samples_per_prompt // 2)
    return cfg.rounds * cfg.train.epochs_per_round * math.ceil(pairs_per_round / cfg.train.batch_size)


def setup(cfg: RunConfig, run_dir: Path, accelerator=None, resume_from: Path | None = None) -> Loop:
    from oaif.distributed import on_main
    from oaif.generate import Generator, InProcessEngine

    g, lora = cfg.generate, cfg.train.lora
    tokenizer = load_tokenizer(cfg.policy.model)
    trainer = build_trainer(cfg, tokenizer.pad_token_id, schedule_steps(cfg), accelerator, resume_from)
    loop = Loop(cfg, run_dir, None, None, trainer, None, tokenizer, accelerator, g.server_url)
    if resume_from:
        loop.policy_version = read_trainer_state(resume_from)["policy_version"]

    def engines() -> str:  # rank 0 only
        if accelerator is not None and not g.server_url:
            loop.server_url, loop.server = start_local_server(cfg)
        if loop.server_url:
            from oaif.server import ServerEngine

            engine = ServerEngine(loop.server_url)
        else:
            from oaif.engines import build_llm

            loop.llm = build_llm(cfg.policy.model, cfg.policy.dtype, cfg.seed, g.kv_cache_gib,
                                 cfg.policy.max_prompt_tokens + max(g.max_new_tokens, eval_max_new_tokens(cfg)),
                                 g.tensor_parallel_size,
                                 g.gpu_memory_utilization,
                                 max_lora_rank=lora.r if lora.enabled and lora.sync == "vllm_lora" else 0,
                                 enforce_eager=g.enforce_eager)
            engine = InProcessEngine(loop.llm)
        loop.generator = Generator(engine, tokenizer, g, cfg.policy.max_prompt_tokens, cfg.seed)
        loop.annotator = build_annotator(cfg)
        return loop.server_url

    try:   # a server started here must not outlive a failure of what follows
        loop.server_url = on_main(accelerator, engines)   # every rank learns whether weights go to a server
        # The first round must sample from the policy as it starts: an in-process engine holds
        # the base weights (wrong when starting from an adapter or resuming); a server may hold
        # anything (an earlier run's).
        if lora.adapter or loop.server_url or resume_from:
            loop.sync()
        if cfg.eval.every:   # single process (check_distributed refuses it under a launcher)
            from oaif.evaluate import Evaluator, baseline_responses

            baseline = baseline_responses(cfg, run_dir, loop.generator.engine, tokenizer, fresh=resume_from is None)
            judge = loop.annotator if cfg.eval.annotate is None else build_annotator(eval_annotator_config(cfg))
            loop.evaluator = Evaluator(cfg, run_dir, judge, baseline)
    except BaseException:
        loop.close()
        raise
    return loop


def run(cfg: RunConfig, log=print, resume_dir: Path | None = None, checkpoint: Path | None = None) -> Path:
    """Run every round; returns the run directory. Under `accelerate launch` every rank runs
    this; rank 0 alone writes files and prints. With resume_dir: continue that run from
    `checkpoint` (default: its latest) instead of starting a new one."""
    from oaif.distributed import end, make_accelerator

    accelerator = make_accelerator()
    try:
        return _run(cfg, accelerator, log if accelerator is None or accelerator.is_main_process else (lambda *_: None),
                    resume_dir, checkpoint)
    finally:
        end(accelerator)


class GracefulStop:
    """SIGINT / SIGTERM: finish the round in flight, checkpoint it, stop cleanly (exit 0) with
    a resume line; a second signal stops at once (the engines and servers are still closed).
    Installed on every rank for the rounds of a run (stop_agreed makes the ranks stop together)
    and restored after them."""

    def __init__(self):
        self.signal: str | None = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: finishing this round, then a checkpoint; send it again to stop at once",
              file=sys.stderr, flush=True)

    def __bool__(self) -> bool:
        return self.signal is not None

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def stop_agreed(stop: GracefulStop, accelerator) -> bool:
    """Whether any rank was signalled: every rank must stop after the same round, checkpoint
    included (a collective), or the others would wait for it forever."""
    if accelerator is None or accelerator.num_processes == 1:
        return bool(stop)
    flag = torch.tensor([1.0 if stop else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def check_models(cfg: RunConfig) -> None:
    """The policy and baseline models exist (before any file is written; check_inputs checks
    the judges')."""
    check_model(cfg.policy.model, "policy.model")
    if cfg.eval.every and cfg.eval.baseline:
        check_model(cfg.eval.baseline, "eval.baseline")


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


def _run(cfg: RunConfig, accelerator, log, resume_dir: Path | None, checkpoint: Path | None) -> Path:
    from oaif.distributed import check_distributed, on_main

    # Bad input fails here, before any engine starts or any file is written.
    prompts = load_prompts(cfg.prompts)
    check_models(cfg)
    check_inputs(cfg)
    check_distributed(cfg, accelerator)
    if cfg.eval.every:
        eval_prompts(cfg)
        check_inputs(eval_annotator_config(cfg), "eval.annotate" if cfg.eval.annotate else "annotate")
        if cfg.eval.annotate is None:
            log(TRAINING_JUDGE_WARNING)
    start = 0
    if resume_dir is None:
        run_dir = on_main(accelerator, lambda: prepare_run_dir(cfg))
    else:
        # No checkpoint yet (stopped in its first rounds): the run starts again from round 0.
        run_dir, checkpoint = resume_dir, checkpoint or latest_checkpoint(resume_dir)
        state = read_trainer_state(checkpoint) if checkpoint else None
        done = state["round"] if state else -1
        start = done + 1
        if start >= cfg.rounds:
            raise ConfigError(f"{run_dir}: rounds 0-{done} are done ({checkpoint.name}); "
                              f"pass rounds=N with N > {start} to continue")
        anchor = schedule_anchor(cfg.train, state, schedule_steps(cfg)) if state else None
        if anchor and anchor[1] == 0.0 and cfg.train.lr_schedule != "constant":
            raise ConfigError(f"train.lr_schedule: the {cfg.train.lr_schedule} schedule had reached 0 at "
                              f"{checkpoint.name}, so more rounds would train nothing; resume with "
                              f"train.lr_schedule=constant (at train.learning_rate) to go on")
        is_adapter = checkpoint is not None and (checkpoint / "policy/adapter_config.json").is_file()
        if checkpoint is not None and is_adapter != cfg.train.lora.enabled:
            raise ConfigError(f"{checkpoint}: holds {'a LoRA adapter' if is_adapter else 'full weights'} but "
                              f"train.lora.enabled is {cfg.train.lora.enabled}")
        dropped = on_main(accelerator, lambda: rewind_run_dir(cfg, run_dir, done))
        log((f"resuming {run_dir} after round {done} from {checkpoint}" if checkpoint else
             f"resuming {run_dir} from round 0 (it stopped before its first checkpoint)")
            + (f"; dropped what came later: {', '.join(dropped)}" if dropped else ""))
    stop = GracefulStop()   # under a launcher every rank gets the signal (the launcher forwards it)
    loop = setup(cfg, run_dir, accelerator, checkpoint if resume_dir else None)
    try:
        log(f"run directory: {run_dir}" + (f" ({accelerator.num_processes} processes)" if accelerator else ""))
        log(header())
        batches = round_prompts(prompts, cfg.prompts_per_round, cfg.seed)
        for _ in range(start):   # the prompts the done rounds used
            next(batches)
        lengths = []
        for index in range(start, cfg.rounds):
            try:
                metrics = loop.round(index, batches)
            except TooManyInvalid as e:   # nothing of this round was trained: the last round's state is whole
                if index == 0:
                    raise RunStopped(f"{e}. Fix the judge, then `oaif resume {run_dir}` starts again") from None
                if not (run_dir / "checkpoints" / f"round_{index - 1:06d}").is_dir():
                    checkpoint_now(run_dir, loop.trainer, loop.tokenizer, accelerator, index - 1, loop.policy_version)
                raise RunStopped(f"{e}. Checkpoint after round {index - 1} is written; fix the judge, then "
                                 f"`oaif resume {run_dir}`") from None
            if cfg.eval.every and ((index + 1) % cfg.eval.every == 0 or index == cfg.rounds - 1):
                metrics |= loop.evaluate(index)
            stopping = stop_agreed(stop, accelerator)
            finish_round(cfg, run_dir, loop.trainer, loop.tokenizer, accelerator, index, loop.policy_version, metrics,
                         last=index == cfg.rounds - 1 or stopping)
            log(format_row(metrics))
            if "eval/win_rate_vs_ref" in metrics:
                log(f"  eval after round {index}: {format_summary(metrics)}")
            if (warning := label_mass_warning(metrics)) and index == start:
                log(f"  {warning}")
            lengths.append(metrics["generate/mean_length"])
            if stopping and index < cfg.rounds - 1:
                who = stop.signal or "a signal to another rank"
                log(f"stopped by {who} after round {index}, checkpoint written; resume with: oaif resume {run_dir}")
                return run_dir
    finally:
        loop.close()
        stop.restore()
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731 (None: every prompt of a round was too long)
    log(f"done: {cfg.rounds} rounds" + (f" (resumed after round {start - 1})" if start else "")
        + f", policy version {loop.policy_version}; mean response length "
        f"{fmt(lengths[0])} -> {fmt(lengths[-1])} tokens; records and metrics.jsonl in {run_dir}")
    return run_dir


def finish_round(cfg: RunConfig, run_dir: Path, trainer, tokenizer, accelerator, index: int, policy_version: int,
                 metrics: dict, last: bool) -> None:
    """metrics.jsonl and replicas.jsonl, then the checkpoint when due; rank 0 writes."""
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
    if last or (cfg.train.checkpoint_every and (index + 1) % cfg.train.checkpoint_every == 0):
        checkpoint_now(run_dir, trainer, tokenizer, accelerator, index, policy_version)


def checkpoint_now(run_dir: Path, trainer, tokenizer, accelerator, index: int, policy_version: int) -> None:
    """Every rank calls it (the weights may have to be gathered from shards); rank 0 writes."""
    from oaif.distributed import gathered_state_dict, on_main

    state = gathered_state_dict(accelerator, trainer.model)
    keep = trainer.cfg.keep_checkpoints
    on_main(accelerator, lambda: save_checkpoint(run_dir, index, policy_version, trainer, tokenizer, state, keep))
