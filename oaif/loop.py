"""The OAIF loop: generate → annotate (both orders) → train (online DPO) → sync, per round.

    oaif run configs/tiny_cpu.yaml [key=value ...]
    oaif resume runs/NAME [key=value ...]      (continue from the latest checkpoint)

Each round samples from the policy as it is *now* (the engine holds the weights of the
last sync), so the preference data is always on-policy (OAIF, Guo et al. 2024, Alg. 1).
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from pathlib import Path
from typing import Iterator, Protocol

import torch

from oaif.annotate.judge import Judged, injection_attempts, judgment_metrics, label_mass_warning
from oaif.annotate.rank import max_pairs_per_prompt, rank_groups
from oaif.annotate.base import close_annotator
from oaif.annotate.select import build_annotator, check_inputs, reload_constitutions, with_python_annotator
from oaif.checkpoint import read_trainer_state, restore_trainer, schedule_anchor
from oaif.config import ConfigError, RunConfig, RunStopped
from oaif.console import GracefulStop, LibraryLogs, Progress, format_row, header
from oaif.datasets_io import export_pairs, load_prompts
from oaif.distributed import stop_agreed
from oaif.evaluation import TRAINING_JUDGE_WARNING, eval_annotator_config, eval_prompts, format_summary
from oaif.evaluation import max_new_tokens as eval_max_new_tokens
from oaif.faults import crash_point
from oaif.generate import check_model, load_tokenizer
from oaif.records import PreferencePair, Prompt, Sample, as_prompts, write_jsonl
from oaif.rundir import (RunComplete, RunLock, checkpoint_now, finish_round, prepare_run_dir, resume_config,
                         run_identity, start_resume)
from oaif.tracking import Trackers, check_trackers, markdown_table, sample_table
from oaif.train import PreferenceTrainer, build_policy


class TooManyInvalid(RunStopped):
    pass


@dataclasses.dataclass
class Drawn:
    """async_rounds: a round's samples already drawn (collected for a checkpoint, or read back
    from one), so a resumed run trains on the very samples an uninterrupted one would."""
    round: int
    groups: list[list[Sample]]
    metrics: dict


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


STOP = "stop"   # a callback's on_round_end returns it to end the run after this round (checkpointed)
HOOKS = ("on_round_start", "on_round_end", "on_run_end")
STAGES = ("generate", "annotate", "train", "sync")   # each adds {stage}/seconds to the round's metrics


class Callback(Protocol):
    """Hooks into `Loop.rounds()` (and so `oaif.run`); each method is optional, and a plain
    function is taken as on_round_end. Under a launcher every rank calls its own."""

    def on_round_start(self, index: int, loop: "Loop") -> None: ...

    def on_round_end(self, metrics: dict, loop: "Loop") -> str | None:
        """metrics: the round's line of metrics.jsonl. Return oaif.STOP to end the run after
        this round, with its checkpoint; None to go on."""
        ...

    def on_run_end(self, loop: "Loop") -> None: ...


class Loop:
    """The OAIF loop as an object, for scripts that decide between rounds or run the stages
    themselves:

        with oaif.Loop(cfg) as loop:
            for metrics in loop.rounds():   # records, metrics and checkpoints written as by `oaif run`
                if metrics["generate/mean_length"] < 20:
                    break                   # a clean stop: the round just seen is checkpointed

    Entering checks every input (before any file is written or engine started), makes the
    run directory (with resume_dir: rewinds it to `checkpoint`, default the latest) and starts
    the engines; leaving stops them. The stages one at a time (one process):
    generate(prompts) -> one group of samples per prompt; annotate(groups) -> the judgments and
    kept pairs; train(pairs) -> train metrics; sync() -> seconds. They write no records
    (rounds() does) and add to `metrics`, the metrics of the round in progress (`index`).
    Under `accelerate launch` every rank runs the script; rank 0 alone samples, judges, writes
    and prints.

    annotator: your judge (a function or an annotator object, see annotate/python_fn.py) in
    place of the config's; prompts: the prompt set (strings, chat message lists, {"prompt"}
    or {"messages"} rows) in place of cfg.prompts, saved in the run directory so that
    `oaif resume` finds it; callbacks: see Callback."""

    def __init__(self, cfg: RunConfig, *, annotator=None, prompts=None, callbacks=(), resume_dir: Path | None = None,
                 checkpoint: Path | None = None, log=print):
        if annotator is not None:
            cfg = with_python_annotator(cfg, annotator)
        self.cfg, self.python, self.given_prompts, self.callbacks = cfg, annotator, prompts, list(callbacks)
        self.resume_dir, self.checkpoint = resume_dir, checkpoint
        self._print = log            # oaif's own lines go here (and to run.log)
        self.logs: LibraryLogs | None = None
        self.progress = Progress(0, 0, enabled=False)   # bars while rounds() runs, on a terminal
        self.trackers: Trackers | None = None
        self.table: list[list[str]] = []   # the round in progress's sample table
        self.accelerator = self.run_dir = self.generator = self.annotator = self.trainer = None
        self.llm = None              # the in-process engine; None in server mode
        self.actor = None            # async_rounds: the engine in its own process (actor.ProcessEngine)
        self.tokenizer = None
        self.server_url = cfg.generate.server_url   # or the server rank 0 started
        self.server = None           # the server process rank 0 started (stopped by close)
        self.evaluator = None        # eval.every > 0: the policy against its start, held out
        self.prompts: list[Prompt] = []
        self.policy_version = 0
        self.index = 0               # the round in progress, or the next one
        self.metrics: dict = {}      # the round in progress's metrics so far
        self.annotator_totals: dict = {}   # annotator.stats at the end of the last round
        self.refused: dict = {}      # constitution versions refused by reload_constitution
        self.startup: dict = {}      # startup/* seconds, added to the first round's metrics of this process
        self.pending = None          # async_rounds: the next round's samples, being drawn while this one trains
        self.rankings: list = []     # annotate.ranking round_robin / knockout: the last annotate()'s per-prompt rankings
        self.identity: dict = {}     # what the run is (rundir.run_identity), kept in every checkpoint
        self.lock: RunLock | None = None   # rank 0 holds the run directory while it runs
        self._rounds = None

    def __enter__(self) -> "Loop":
        from oaif.distributed import make_accelerator

        t0 = time.perf_counter()
        self.logs = LibraryLogs(self.cfg.verbose)
        try:
            self.accelerator = make_accelerator()
            self._open()
            self.startup["startup/seconds"] = time.perf_counter() - t0
        except BaseException as e:
            self.close(e)
            raise
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(error)

    @property
    def main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def log(self, line: str) -> None:
        """One of oaif's own lines: to the terminal (above the bars) and to run.log; rank 0."""
        if not self.main:
            return
        if self.progress.enabled:
            self.progress.write(line)
        else:
            self._print(line)
        if self.logs is not None:
            self.logs.handler.write(line)

    def close(self, error: BaseException | None = None) -> None:
        from oaif.distributed import end

        try:
            if self._rounds is not None:
                self._rounds.close()   # a script that left rounds() early: its last round is checkpointed
        finally:
            if self.trackers is not None:
                self.trackers.close()
                self.trackers = None
            if self.logs is not None:
                if error is not None and self.main:   # the terminal gets it from the caller; the log keeps it
                    self.logs.handler.write(f"oaif: error: {type(error).__name__}: {error}")
                self.logs.close()
                self.logs = None
            if self.evaluator is not None and self.evaluator.annotator is not self.annotator:
                close_annotator(self.evaluator.annotator)   # eval.annotate's own judge
            if self.annotator is not None:
                close_annotator(self.annotator)   # a vLLM judge's engine ends now, as the policy's below
            if self.server_url and self.generator is not None:
                self.generator.engine.close()   # the server client's connections and threads
            if self.server is not None:
                from oaif.server import stop_server

                stop_server(self.server)
                self.server = None
            if self.llm is not None:   # a script may go on to build another engine: end this one now
                from oaif.engines import shutdown_llm

                shutdown_llm(self.llm)
            if self.actor is not None:
                self.actor.close()
            self.llm = self.actor = self.generator = self.pending = None
            end(self.accelerator)
            self.accelerator = None
            if self.lock is not None:   # last: nothing of this process touches the run directory now
                self.lock.release()
                self.lock = None

    def _open(self) -> None:
        from oaif.distributed import check_distributed, on_main

        cfg, accelerator = self.cfg, self.accelerator
        # Bad input fails here, before any engine starts or any file is written.
        if self.given_prompts is not None:
            self.prompts = as_prompts(self.given_prompts)
            if self.resume_dir is None:   # saved with the run: the config names the saved copy
                self.cfg = cfg = dataclasses.replace(cfg, prompts=str(Path(cfg.output_dir) / cfg.name / "prompts.jsonl"),
                                                     prompts_column="", prompts_split="train")
        else:
            self.prompts = load_prompts(cfg.prompts, "run.prompts", cfg.prompts_column, cfg.prompts_split)
        check_models(cfg)
        check_inputs(cfg, python=self.python)
        check_distributed(cfg, accelerator)
        check_trackers(cfg)
        if cfg.eval.every:
            eval_prompts(cfg)
            check_inputs(eval_annotator_config(cfg), "eval.annotate" if cfg.eval.annotate else "annotate")
            if cfg.eval.annotate is None:
                self.log(TRAINING_JUDGE_WARNING)
        self.identity = run_identity(cfg)
        if self.resume_dir is None:
            saved = self.prompts if self.given_prompts is not None else None

            def prepare() -> Path:
                run_dir, self.lock = prepare_run_dir(cfg, saved)
                return run_dir

            self.run_dir = on_main(accelerator, prepare)
        else:
            self.run_dir = self.resume_dir

            def lock() -> None:
                self.lock = RunLock(self.run_dir)

            on_main(accelerator, lock)
        self.logs.handler.open(self.run_dir / "run.log" if self.main else None)
        if self.resume_dir is not None:
            self.index = self._rewind()
        if self.main and cfg.report_to:
            self.trackers = Trackers(cfg, self.run_dir)
        self._start_engines()

    def _rewind(self) -> int:
        """Resume: check the checkpoint against the run and the config, drop what came after
        it; returns the first round to run. No checkpoint yet (stopped in its first rounds):
        round 0. A finished run whose end-of-run export was cut short gets it redone."""
        from oaif.distributed import on_main

        cfg, run_dir = self.cfg, self.run_dir
        try:
            self.checkpoint, state = start_resume(cfg, run_dir, self.checkpoint, self.identity, self.accelerator,
                                                  self.log)
        except RunComplete as e:
            if export_stale(run_dir):
                on_main(self.accelerator, lambda: export_pairs(run_dir, run_dir / "dataset", overwrite=True))
                e.redone = True
            raise
        anchor = schedule_anchor(cfg.train, state, schedule_steps(cfg)) if state else None
        if anchor and anchor[1] == 0.0 and cfg.train.lr_schedule != "constant":
            raise ConfigError(f"train.lr_schedule: the {cfg.train.lr_schedule} schedule had reached 0 at "
                              f"{self.checkpoint.name}, so more rounds would train nothing; resume with "
                              f"train.lr_schedule=constant (at train.learning_rate) to go on")
        if state:
            self.policy_version = state["policy_version"]
            if (drawn := state.get("next_round")) is not None:
                self.pending = Drawn(drawn["round"], [[Sample(**s) for s in g] for g in drawn["groups"]],
                                     drawn["metrics"])
        return state["round"] + 1 if state else 0

    def _start_engines(self) -> None:
        from oaif.distributed import on_main
        from oaif.generate import Generator, InProcessEngine

        cfg, accelerator, g, lora = self.cfg, self.accelerator, self.cfg.generate, self.cfg.train.lora
        resume_from = self.checkpoint if self.resume_dir else None
        engine_args = dict(model=cfg.policy.model, dtype=cfg.policy.dtype, seed=cfg.seed, kv_cache_gib=g.kv_cache_gib,
                           max_model_len=cfg.policy.max_prompt_tokens + max(g.max_new_tokens, eval_max_new_tokens(cfg)),
                           tensor_parallel_size=g.tensor_parallel_size,
                           gpu_memory_utilization=g.gpu_memory_utilization,
                           max_lora_rank=lora.r if lora.enabled and lora.sync == "vllm_lora" else 0,
                           enforce_eager=g.enforce_eager)
        if cfg.async_rounds:   # its own process (one process run), building while the trainer is built here
            from oaif.actor import ProcessEngine

            self.actor = ProcessEngine(engine_args, threads=cfg.async_threads, cpu_bind=cfg.async_cpus or None,
                                       wait=False)
        t0 = time.perf_counter()
        self.tokenizer = load_tokenizer(cfg.policy.model)
        self.trainer = build_trainer(cfg, self.tokenizer.pad_token_id, schedule_steps(cfg), accelerator, resume_from)
        self.startup["startup/trainer_seconds"] = time.perf_counter() - t0

        def engines() -> str:  # rank 0 only
            if accelerator is not None and not g.server_url:
                from oaif.server import start_local_server

                self.server_url, self.server = start_local_server(cfg)
            if self.server_url:
                from oaif.server import ServerEngine

                engine = ServerEngine(self.server_url, key_env=g.server_api_key_env)
            elif self.actor is not None:
                self.actor.wait_built()
                engine = self.actor
            else:
                from oaif.engines import build_llm

                self.llm = build_llm(**engine_args)
                engine = InProcessEngine(self.llm)
            self.generator = Generator(engine, self.tokenizer, g, cfg.policy.max_prompt_tokens, cfg.seed)
            self.annotator = build_annotator(cfg, self.python)
            return self.server_url

        t0 = time.perf_counter()
        self.server_url = on_main(accelerator, engines)   # every rank learns whether weights go to a server
        self.startup["startup/engine_seconds"] = time.perf_counter() - t0
        # The first round must sample from the policy as it starts: an in-process engine holds
        # the base weights (wrong when starting from an adapter or resuming); a server may hold
        # anything (an earlier run's).
        if lora.adapter or self.server_url or resume_from:
            self.sync()
        if cfg.eval.every:   # single process (check_distributed refuses it under a launcher)
            from oaif.evaluation import Evaluator, baseline_responses

            t0 = time.perf_counter()

            baseline = baseline_responses(cfg, self.run_dir, self.generator.engine, self.tokenizer,
                                          fresh=resume_from is None)
            judge = self.annotator if cfg.eval.annotate is None else build_annotator(eval_annotator_config(cfg))
            self.evaluator = Evaluator(cfg, self.run_dir, judge, baseline)
            self.startup["startup/eval_seconds"] = time.perf_counter() - t0

    # The stages. One process (rank 0 under a launcher for generate and annotate).

    def generate(self, prompts) -> list[list[Sample]]:
        """generate.samples_per_prompt samples per prompt from the policy the engine holds,
        seeded by (seed, round, place): one group per prompt (prompts over
        policy.max_prompt_tokens are skipped and counted). With async_rounds, the samples
        requested for this round during the last one."""
        t0 = time.perf_counter()
        prompts = as_prompts(prompts)
        self.progress.start("generate", len(prompts) * self.cfg.generate.samples_per_prompt, "sample")
        self._draw_pending()   # a request in flight is finished first, whether this round uses it or not
        drawn, self.pending = self.pending, None
        if drawn is not None and drawn.round == self.index:   # requested during the last round
            groups, metrics = drawn.groups, drawn.metrics
        else:
            groups, metrics = self.generator.sample(prompts, self.index, self.policy_version)
        self.progress.advance(sum(len(g) for g in groups))
        self.metrics |= metrics
        self._timed("generate", t0)
        return groups

    def annotate(self, groups: list[list[Sample]]) -> "Judged":
        """Compare each group's samples in both orders (annotate.ranking: consecutive pairs, or
        a ranking of all n, whose per-prompt results are left in `rankings`); Judged.pairs are
        the pairs to train on. With annotate.reload_constitution an edited constitution is
        taken up first."""
        t0 = time.perf_counter()
        if self.cfg.annotate.reload_constitution:
            for line in reload_constitutions(self.annotator, self.cfg.annotate, self.refused):
                self.log(f"  round {self.index}: {line}")
        a = self.cfg.annotate
        self.progress.start("annotate", len(groups), "prompt")
        # Records name the policy that drew the samples (with async_rounds, one update before now).
        drawn_by = groups[0][0].policy_version if groups else self.policy_version
        judged, self.rankings = rank_groups(self.annotator, groups, a.ranking, a.pairs, self.index, drawn_by,
                                            a.missing_eos_penalty)
        self.progress.advance(len(groups))
        # Candidate pairs: every comparison, or one per prompt (best against worst).
        candidates = len(judged.judgments) if a.ranking == "consecutive" or a.pairs == "all" else len(groups)
        totals = dict(self.annotator.stats)
        self.metrics |= {"pairs_kept": len(judged.pairs), "pairs_dropped": candidates - len(judged.pairs),
                         "annotate/comparisons": len(judged.judgments), **judgment_metrics(judged.judgments),
                         "annotate/injection_attempts": injection_attempts(self.annotator,
                                                                           [s.text for g in groups for s in g]),
                         **{f"annotate/{k}": v - self.annotator_totals.get(k, 0) for k, v in totals.items()}}
        self.annotator_totals = totals   # the next call counts from here: the metrics are this call's share
        self._timed("annotate", t0)
        return judged

    def train(self, pairs: list[PreferencePair]) -> dict:
        """train.epochs_per_round passes of the configured loss over `pairs`; the policy
        version goes up (sync() then makes the engine sample from it)."""
        t, t0 = self.cfg.train, time.perf_counter()
        self.progress.start("train", t.epochs_per_round * math.ceil(len(pairs) / t.batch_size), "step")
        metrics = self.trainer.train_round(pairs, on_step=self.progress.advance)
        self.policy_version += 1
        self.metrics |= metrics
        self._timed("train", t0)
        return metrics

    def sync(self) -> float:
        """Make the engine sample from the trainer's current policy; returns seconds. Every
        rank calls it (weights may have to be gathered); rank 0 pushes."""
        from oaif.distributed import gathered_state_dict, on_main
        from oaif.sync import hf_named_weights, merged_copy, push_lora_adapter, push_weights

        g, policy, lora = self.cfg.generate, self.trainer.policy, self.cfg.train.lora
        crash_point("sync")
        self.progress.start("sync", 1, "push")
        t0 = time.perf_counter()
        if self.server_url:
            from oaif.server import push_weights_to_server

            state = None if lora.enabled else gathered_state_dict(self.accelerator, self.trainer.model)
            on_main(self.accelerator, lambda: push_weights_to_server(
                self.server_url, merged_copy(policy), g.server_weights_dir, state_dict=state,
                key_env=g.server_api_key_env))
        elif self.actor is not None:   # into shared memory; the engine process loads it after its current request
            self.actor.push(hf_named_weights(policy))
        elif lora.enabled and lora.sync == "vllm_lora":
            self.generator.engine.lora_request = push_lora_adapter(policy, self.run_dir / "adapters",
                                                                   self.policy_version)
        else:
            push_weights(self.llm, policy)
        self.progress.advance()
        return self._timed("sync", t0)

    def evaluate(self, index: int) -> dict:
        """eval/* metrics of the policy the engine holds now (one process)."""
        self.progress.start("eval", 1, "evaluation")
        t0 = time.perf_counter()
        self._draw_pending()   # async_rounds: the engine answers in order; the next round's samples first
        metrics = self.evaluator(self.generator.engine, self.tokenizer, self.trainer, index, self.policy_version)
        return metrics | {"eval/seconds": time.perf_counter() - t0}

    def _timed(self, stage: str, t0: float) -> float:
        """Adds the seconds since t0 to {stage}/seconds of the round in progress (a script
        may call a stage twice); returns them."""
        seconds = time.perf_counter() - t0
        self.metrics[f"{stage}/seconds"] = self.metrics.get(f"{stage}/seconds", 0.0) + seconds
        return seconds

    # Whole rounds.

    def rounds(self) -> Iterator[dict]:
        """Runs the rounds left (to cfg.rounds), yielding each round's metrics once its
        records, metrics line and (when due) checkpoint are written. SIGINT/SIGTERM or a
        callback's STOP end it after the round in flight, checkpointed; so does leaving the
        for loop early. Call it again after a break to go on."""
        self._rounds = self._run_rounds()
        return self._rounds

    def _run_rounds(self) -> Iterator[dict]:
        from oaif.distributed import on_main

        cfg, run_dir, accelerator = self.cfg, self.run_dir, self.accelerator
        batches = round_prompts(self.prompts, cfg.prompts_per_round, cfg.seed)
        for _ in range(self.index):   # the prompts the done rounds used
            next(batches)
        first, lengths, checkpointed = self.index, [], True
        stop = GracefulStop()   # under a launcher every rank gets the signal (the launcher forwards it)
        # Bars decorate the default terminal output; a script's own log function gets plain lines.
        self.progress = Progress(first, cfg.rounds, enabled=self.main and self._print is print and sys.stderr.isatty())
        try:
            self.log(f"run directory: {run_dir}" + (f" ({accelerator.num_processes} processes)" if accelerator else ""))
            self.log(header())
            upcoming = next(batches)
            for index in range(first, cfg.rounds):
                for hook in self._hooks("on_round_start"):
                    hook(index, self)
                prompts, upcoming = upcoming, next(batches)
                metrics = self._round(index, prompts, upcoming if index + 1 < cfg.rounds else None)
                wanted = self._stop_wanted(metrics)
                stopping = stop_agreed(bool(stop) or wanted, accelerator)
                checkpointed = finish_round(cfg, run_dir, self.trainer, self.tokenizer, accelerator, index,
                                            self.policy_version, metrics, last=index == cfg.rounds - 1 or stopping,
                                            extra=self._checkpoint_extra)
                self._show(metrics, first_round=index == first)
                lengths.append(metrics["generate/mean_length"])
                self.index = index + 1
                yield metrics
                if stopping and index < cfg.rounds - 1:
                    who = stop.signal or ("a callback (oaif.STOP)" if wanted else "a signal to another rank")
                    self.log(f"stopped by {who} after round {index}, checkpoint written; resume with: "
                             f"oaif resume {run_dir}")
                    break
        except GeneratorExit:   # the script left its for loop: the round it saw last is kept
            if not checkpointed:
                checkpoint_now(run_dir, self.trainer, self.tokenizer, accelerator, self.index - 1,
                               self.policy_version, self._checkpoint_extra())
                self.log(f"stopped by the script after round {self.index - 1}, checkpoint written; resume with: "
                         f"oaif resume {run_dir}")
            raise
        finally:
            stop.restore()
            self.progress.close()
            self.progress = Progress(0, 0, enabled=False)
        # Every kept pair so far, as datasets in TRL's formats (replaced as the run goes on).
        on_main(accelerator, lambda: export_pairs(run_dir, run_dir / "dataset", overwrite=True))
        for hook in self._hooks("on_run_end"):
            hook(self)
        if self.index == cfg.rounds and lengths:
            fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731 (None: every prompt of a round was too long)
            self.log(f"done: {cfg.rounds} rounds" + (f" (resumed after round {first - 1})" if first else "")
                     + f", policy version {self.policy_version}; mean response length "
                     f"{fmt(lengths[0])} -> {fmt(lengths[-1])} tokens; records and metrics.jsonl in {run_dir}")

    def _round(self, index: int, prompts: list[Prompt], upcoming: list[Prompt] | None) -> dict:
        """One round on every rank, the recipe: rank 0 samples, judges and writes the round's
        records; every rank trains on the kept pairs; the engine gets the new weights; the
        policy is evaluated when due. upcoming: the next round's prompts (async_rounds samples
        them while this round trains)."""
        from oaif.distributed import on_main

        t0 = time.perf_counter()
        self.index, self.metrics = index, {}
        pairs, self.metrics = on_main(self.accelerator, lambda: self._sample_and_judge(index, prompts, upcoming))
        self._stop_if_mostly_invalid(index)
        if pairs:
            self.train(pairs)
            self.sync()
        seconds = time.perf_counter() - t0
        # Time in no stage: writing the round's records, moving pairs between ranks.
        overhead = seconds - sum(self.metrics.get(f"{s}/seconds", 0.0) for s in STAGES)
        startup, self.startup = self.startup, {}
        metrics = {"round": index, "policy_version": self.policy_version, **self.metrics, **startup,
                   "round/seconds": seconds, "round/overhead_seconds": overhead,
                   "round/pairs_per_s": len(pairs) / seconds}
        every = self.cfg.eval.every
        if every and ((index + 1) % every == 0 or index == self.cfg.rounds - 1):
            metrics |= self.evaluate(index)
        return metrics

    def _sample_and_judge(self, index: int, prompts: list[Prompt], upcoming: list[Prompt] | None
                          ) -> tuple[list[PreferencePair], dict]:
        """Rank 0: sample, judge both orders, write the round's records as each is done;
        returns (kept pairs, metrics). async_rounds: the next round's samples are requested as
        soon as this round's are in, from the weights the engine holds (this round's training
        is pushed after them)."""
        out = self.run_dir / "rounds" / f"{index:06d}"
        from oaif.conversation import extend_conversations   # generate.turns > 1: grow each conversation first
        prompts = extend_conversations(self.generator, prompts, index, self.metrics)
        groups = self.generate(prompts)
        if self.cfg.async_rounds and upcoming is not None:
            self.pending = self.generator.submit(upcoming, index + 1, self.policy_version)
        write_jsonl(out / "samples.jsonl", [s for g in groups for s in g])
        crash_point("generate")
        judged = self.annotate(groups)
        write_jsonl(out / "judgments.jsonl", judged.judgments)
        crash_point("annotate")
        write_jsonl(out / "pairs.jsonl", judged.pairs)
        if self.rankings:
            write_jsonl(out / "rankings.jsonl", self.rankings)
        self.table = sample_table([s for g in groups for s in g], judged.judgments)
        (out / "samples.md").write_text(markdown_table(self.table))
        return judged.pairs, self.metrics

    def _stop_if_mostly_invalid(self, index: int) -> None:
        """annotate.max_invalid_rate: stop before training on what is left. Every rank sees rank
        0's metrics and stops alike; nothing of this round was trained, so the last round's
        state is whole and is what a resume continues from."""
        invalid, ceiling = self.metrics.get("annotate/invalid_rate"), self.cfg.annotate.max_invalid_rate
        if invalid is None or invalid <= ceiling:
            return
        why = (f"round {index}: {invalid:.0%} of the judged pairs got an invalid judgment (> annotate.max_invalid_rate "
               f"{ceiling:g}), so the round was not trained on; the judge's raw answers are in "
               f"{self.run_dir / 'rounds' / f'{index:06d}' / 'judgments.jsonl'}")
        if index == 0:
            raise TooManyInvalid(f"{why}. Fix the judge, then `oaif resume {self.run_dir}` starts again")
        if not (self.run_dir / "checkpoints" / f"round_{index - 1:06d}").is_dir():
            checkpoint_now(self.run_dir, self.trainer, self.tokenizer, self.accelerator, index - 1,
                           self.policy_version, self._checkpoint_extra())
        raise TooManyInvalid(f"{why}. Checkpoint after round {index - 1} is written; fix the judge, then "
                             f"`oaif resume {self.run_dir}`")

    def _checkpoint_extra(self) -> dict:
        """What a checkpoint keeps besides the trainer: the run's identity and, with
        async_rounds, the next round's samples. Those were drawn from the weights before this
        round's update; a resume could not draw them again (the checkpoint holds the newer
        weights), so they are collected now and saved."""
        extra = {"identity": self.identity}
        if self._draw_pending():
            extra["next_round"] = {"round": self.pending.round, "metrics": self.pending.metrics,
                                   "groups": [[dataclasses.asdict(s) for s in g] for g in self.pending.groups]}
        return extra

    def _draw_pending(self) -> bool:
        """async_rounds: wait for the next round's samples, in flight in the engine process,
        and keep them for that round; returns whether there are any."""
        if self.pending is not None and not isinstance(self.pending, Drawn):
            groups, metrics = self.generator.collect(self.pending)
            self.pending = Drawn(self.pending.round, groups, metrics)
        return self.pending is not None

    def _show(self, metrics: dict, first_round: bool) -> None:
        """A finished round to the trackers and the terminal."""
        if self.trackers is not None:
            self.trackers.log(metrics, self.table)
        self.progress.round_done()
        self.log(format_row(metrics))
        if "eval/win_rate_vs_ref" in metrics:
            self.log(f"  eval after round {metrics['round']}: {format_summary(metrics)}")
        if first_round and (warning := label_mass_warning(metrics)):
            self.log(f"  {warning}")

    def _hooks(self, name: str):
        for cb in self.callbacks:
            if hasattr(cb, name):
                yield getattr(cb, name)
            elif name == "on_round_end" and callable(cb) and not any(hasattr(cb, h) for h in HOOKS):
                yield cb   # a plain function

    def _stop_wanted(self, metrics: dict) -> bool:
        wanted = False
        for hook in self._hooks("on_round_end"):
            said = hook(metrics, self)
            if said not in (None, STOP):
                raise TypeError(f"callback {getattr(hook, '__qualname__', hook)!r} returned {said!r}: return "
                                f"oaif.STOP to end the run after this round, or None to go on")
            wanted |= said == STOP
        return wanted


def run(cfg: RunConfig, *, annotator=None, prompts=None, callbacks=(), log=print) -> Path:
    """Every round of a new run (`oaif run`); returns its run directory."""
    with Loop(cfg, annotator=annotator, prompts=prompts, callbacks=callbacks, log=log) as loop:
        for _ in loop.rounds():
            pass
    return loop.run_dir


def resume(run_dir: str | Path, overrides: list[str] = (), *, checkpoint: str | Path | None = None, annotator=None,
           callbacks=(), log=print) -> Path:
    """`oaif resume`: continue a run from `checkpoint` (default: its latest); anything
    recorded after it is dropped and redone. overrides: key=value on its saved config."""
    run_dir = Path(run_dir)
    if is_offline_run(run_dir):
        from oaif.offline import resume_offline

        return resume_offline(run_dir, overrides, checkpoint=Path(checkpoint) if checkpoint else None, log=log)
    cfg = resume_config(run_dir, overrides)
    try:
        with Loop(cfg, annotator=annotator, callbacks=callbacks, resume_dir=run_dir,
                  checkpoint=Path(checkpoint) if checkpoint else None, log=log) as loop:
            for _ in loop.rounds():
                pass
    except RunComplete as e:
        if not e.redone:
            raise
        log(f"{e}; its end-of-run export (cut short) is redone: {run_dir / 'dataset'}")
    return run_dir


def is_offline_run(run_dir: Path) -> bool:
    """`oaif offline` keeps the pairs it trains on in the run directory itself."""
    return (run_dir / "pairs.jsonl").is_file()


def export_stale(run_dir: Path) -> bool:
    """The end-of-run export is missing, or older than the last metrics line (cut short)."""
    dataset, metrics = run_dir / "dataset", run_dir / "metrics.jsonl"
    return not dataset.is_dir() or (metrics.is_file() and dataset.stat().st_mtime < metrics.stat().st_mtime)


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
    pairs_per_round = cfg.prompts_per_round * max_pairs_per_prompt(cfg.generate.samples_per_prompt,
                                                                   cfg.annotate.ranking, cfg.annotate.pairs)
    return cfg.rounds * cfg.train.epochs_per_round * math.ceil(pairs_per_round / cfg.train.batch_size)


def check_models(cfg: RunConfig) -> None:
    """The policy and baseline models exist (before any file is written; check_inputs checks
    the judges')."""
    check_model(cfg.policy.model, "policy.model")
    if cfg.eval.every and cfg.eval.baseline:
        check_model(cfg.eval.baseline, "eval.baseline")


