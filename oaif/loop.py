"""The OAIF loop (`oaif run`): per round, prompts → samples from the policy as it is now
(generate.py) → judgments in both orders and the kept pairs (annotate/stage.py) → an update
(train.py) → the engine's new weights (engine/), so the preference data is always on-policy
(OAIF, Guo et al. 2024, Alg. 1). The run directory (rundir.py) is its only writer.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from oaif.alarms import AFTER_TRAINING, BEFORE_TRAINING, AlarmStop, Trip, tripped
from oaif.annotate.backends import with_python_annotator
from oaif.annotate.budget import spent_out
from oaif.annotate.base import close_annotator
from oaif.annotate.judge import Judged, label_mass_warning
from oaif.annotate.stage import AnnotateStage, TooManyInvalid
from oaif.callbacks import Callbacks
from oaif.config import RunConfig, RunStopped
from oaif.console import GracefulStop, RunConsole, done_line, header
from oaif.conversation import extend_conversations
from oaif.datasets_io import export_pairs
from oaif.distributed import end, gathered_state_dict, make_accelerator, on_main, stop_agreed
from oaif.engine import on_server
from oaif.engine.server import ServerGone
from oaif.evaluation import Evaluator, format_summary
from oaif.faults import crash_point
from oaif.generate import Generator, round_prompts
from oaif.models import dtype_line
from oaif.policy_features import pooled_features
from oaif.records import PreferencePair, Prompt, Sample, as_prompts
from oaif.rundir import RunDir
from oaif.startup import open_run, start_evaluator, start_parts
from oaif.tracking import sample_table


@dataclass
class Round:
    """What a round made; metrics: its line of metrics.jsonl."""
    index: int
    judged: Judged
    rankings: list
    table: list[list[str]]
    metrics: dict


class Loop:
    """The loop as an object (README, "Python API"): entering checks every input, then makes
    (or with resume_dir rewinds to `checkpoint`) the run directory and starts the engines;
    rounds() runs the rounds left; leaving stops the engines. The stages one at a time
    (generate, annotate, train, sync) write no records and add to `metrics`, the round
    `index`'s. annotator: your judge in place of the config's; prompts: your prompt set,
    saved in the run directory; callbacks: see callbacks.py. Under `accelerate launch` every
    rank runs it; rank 0 alone samples, judges, writes and prints."""

    def __init__(self, cfg: RunConfig, *, annotator=None, prompts=None, callbacks=(), resume_dir: Path | None = None,
                 checkpoint: Path | None = None, log=print):
        cfg = with_python_annotator(cfg, annotator) if annotator is not None else cfg
        cfg, self.run = RunDir.planned(cfg, resume_dir, checkpoint, prompts)
        self.cfg, self.callbacks, self.out = cfg, Callbacks(callbacks), RunConsole(log)
        self.judge = AnnotateStage(cfg.annotate, python=annotator, seed=cfg.seed)   # its annotator is built on entering
        self.generator: Generator | None = None
        self.trainer = None
        self.evaluator: Evaluator | None = None   # eval.every / live_prompts: the policy against its start, held out
        self.index = 0        # the round in progress, or the next one
        self.metrics: dict = {}   # the stages' metrics of the round in progress (scripts calling them)
        # The run stops once this round is written and checkpointed: a server lost at the sync,
        # an alarm read after training (alarms.action=stop).
        self.halt: RunStopped | None = None
        self._rounds = None

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def prompts(self) -> list[Prompt]:
        return self.run.prompts

    @property
    def tokenizer(self):
        return self.run.tokenizer

    @property
    def policy_version(self) -> int:
        return self.trainer.version

    def __enter__(self) -> "Loop":
        """Inputs checked, then the run directory (rewound for a resume), the trackers, the
        trainer, the engine and judges, the evaluator."""
        t0, cfg, run = time.perf_counter(), self.cfg, self.run
        try:
            run.accelerator = make_accelerator()
            self.out.open(cfg.verbose, run.main)
            state = open_run(cfg, run, self.judge.python, self.out)
            self.index = state["round"] + 1 if state else 0
            self.trainer, self.generator, startup = start_parts(cfg, run, self.judge, state)
            # The first round must sample from the policy as it starts: an in-process engine holds
            # the base weights (wrong when starting from an adapter or resuming); a server may hold
            # anything (an earlier run's).
            if cfg.train.lora.adapter or run.resume_from or on_server(cfg, run.accelerator is not None):
                self.sync()
            if cfg.eval.every or cfg.eval.live_prompts:   # single process (check_distributed refuses a launch)
                self.evaluator = start_evaluator(cfg, run, self.generator, self.judge, startup)
            self.metrics = {"startup/seconds": time.perf_counter() - t0, **startup}
        except BaseException as e:
            self.close(e)
            raise
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(error)

    def close(self, error: BaseException | None = None) -> None:
        try:
            if self._rounds is not None:
                self._rounds.close()   # a script that left rounds() early: its last round is checkpointed
        finally:
            self.out.close(error)
            if self.evaluator is not None and self.evaluator.annotator is not self.judge.annotator:
                close_annotator(self.evaluator.annotator)   # eval.annotate's own judge
            self.judge.close()   # a vLLM judge's engine ends now, as the policy's below
            if self.generator is not None:   # a script may go on to build another engine: end this one now
                self.generator.engine.close()
                self.generator = None
            end(self.run.accelerator)
            self.run.accelerator = None
            self.run.close()   # last: nothing of this process touches the run directory now

    # The stages. One process (rank 0 under a launcher for generate and annotate).

    def generate(self, prompts) -> list[list[Sample]]:
        """One group of generate.samples_per_prompt samples per prompt from the policy the
        engine holds (Generator.sample: seeded, too-long prompts skipped and counted)."""
        prompts = as_prompts(prompts)
        with self._stage("generate", len(prompts) * self.cfg.generate.samples_per_prompt, "sample"):
            groups, metrics = self.generator.sample(prompts, self.index, self.policy_version)
            self.out.progress.advance(sum(len(g) for g in groups))
        self.metrics |= metrics
        return groups

    def annotate(self, groups: list[list[Sample]]) -> Judged:
        """Each group's samples compared in both orders (AnnotateStage); Judged.pairs are the
        pairs to train on."""
        return self._annotate(groups)[0]

    def _annotate(self, groups: list[list[Sample]]) -> tuple[Judged, list]:
        with self._stage("annotate", len(groups), "prompt"):
            for line in self.judge.reload():
                self.out.line(f"  round {self.index}: {line}")
            # annotate.select's proxy reads the policy's view of each response (one forward each).
            features = pooled_features(self.trainer.policy, groups, self.tokenizer.pad_token_id) \
                if self.judge.proxy is not None else None
            judged, rankings, metrics = self.judge(groups, self.index, self.policy_version, features)
            self.out.progress.advance(len(groups))
        self.metrics |= metrics
        return judged, rankings

    def train(self, pairs: list[PreferencePair]) -> dict:
        """train.epochs_per_round passes of the configured loss over `pairs`; the policy
        version goes up (sync() then makes the engine sample from it)."""
        t = self.cfg.train
        with self._stage("train", t.epochs_per_round * math.ceil(len(pairs) / t.batch_size), "step"):
            metrics = self.trainer.train_round(pairs, on_step=self.out.progress.advance)
        self.metrics |= metrics
        return metrics

    def sync(self) -> float:
        """Make the engine sample from the trainer's current policy; returns seconds. Every
        rank calls it (a server loads a saved copy: a sharded policy is gathered first)."""
        crash_point("sync")
        trainer, accelerator, t0 = self.trainer, self.run.accelerator, time.perf_counter()
        with self._stage("sync", 1, "push"):
            state = gathered_state_dict(accelerator, trainer.model) \
                if on_server(self.cfg, accelerator is not None) and not self.cfg.train.lora.enabled else None
            on_main(accelerator, lambda: self.generator.engine.load_weights(trainer.policy, trainer.version, state))
            self.out.progress.advance()
        return time.perf_counter() - t0

    def evaluate(self, index: int, live: bool = False) -> dict:
        """eval/* metrics of the policy the engine holds now (one process); live: on this
        round's slice of the prompts (eval.live_prompts)."""
        self.out.progress.start("eval", 1, "evaluation")
        t0 = time.perf_counter()
        self.generator.drawn()   # async_rounds: the engine answers in order; the next round's samples first
        engine, version = self.generator.engine, self.policy_version
        metrics = self.evaluator.live(engine, self.tokenizer, index, version) if live else \
            self.evaluator(engine, self.tokenizer, self.trainer, index, version)
        if self.judge.annotator is not None:   # the training judge's eval calls (eval.train_judge) are not a round's
            self.judge.totals = dict(self.judge.annotator.stats)
        return metrics | {"eval/live_seconds" if live else "eval/seconds": time.perf_counter() - t0}

    @contextlib.contextmanager
    def _stage(self, name: str, total: int, unit: str):
        """The stage's progress bar, and its seconds added to {name}/seconds of the round in
        progress (a script may call a stage twice: its seconds add up)."""
        self.out.progress.start(name, total, unit)
        t0 = time.perf_counter()
        yield
        self.metrics[f"{name}/seconds"] = self.metrics.get(f"{name}/seconds", 0.0) + time.perf_counter() - t0

    def rounds(self) -> Iterator[dict]:
        """The rounds left, each one's metrics yielded once its records, metrics line and (when
        due) checkpoint are written. SIGINT/SIGTERM, a callback's STOP or leaving the for loop
        end it after the round in flight, checkpointed; call it again after a break to go on."""
        self._rounds = self._run_rounds()
        return self._rounds

    def _run_rounds(self) -> Iterator[dict]:
        cfg, run = self.cfg, self.run
        batches = round_prompts(self.prompts, cfg.prompts_per_round, cfg.seed, skip=self.index)
        first, lengths, checkpointed = self.index, [], True
        stop = GracefulStop()   # under a launcher every rank gets the signal (the launcher forwards it)
        self.out.bars(first, cfg.rounds)
        try:
            self.out.line(f"run directory: {run.path}" + (f" ({run.accelerator.num_processes} processes)"
                                                          if run.accelerator else ""))
            self.out.line(dtype_line(cfg.policy.dtype))
            self.out.line(header())
            upcoming = next(batches)
            # A resumed run whose judge budget was spent has nothing left to do.
            last = on_main(run.accelerator, lambda: run.metrics_rows()[-1:])
            spent = spent_out(cfg.annotate.budget, last[0] if last else {})
            for index in range(first, cfg.rounds if spent is None else first):
                self.callbacks.round_start(index, self)
                prompts, upcoming = upcoming, next(batches)
                result = self._round(index, prompts, upcoming if index + 1 < cfg.rounds else None)
                metrics = result.metrics
                wanted = self.callbacks.stop_wanted(metrics, self)
                spent = spent_out(cfg.annotate.budget, metrics)   # every rank reads rank 0's metrics
                stopping = stop_agreed(bool(stop) or wanted, run.accelerator) or self.halt is not None or bool(spent)
                checkpointed = run.finish(cfg, index, self.trainer, metrics, last=index == cfg.rounds - 1 or stopping,
                                          extra=self._extra)
                self.out.round_done(metrics, result.table, [
                    *([f"  eval after round {index}: {format_summary(metrics)}"] if "eval/win_rate_vs_ref" in metrics
                      else []),
                    *([f"  {w}"] if index == first and (w := label_mass_warning(metrics)) else [])])
                lengths.append(metrics["generate/mean_length"])
                self.index, self.metrics = index + 1, {}
                if self.halt is not None:
                    raise self.halt
                yield metrics
                if spent and index < cfg.rounds - 1:
                    break
                if stopping and index < cfg.rounds - 1:
                    self._stopped(stop.signal or ("a callback (oaif.STOP)" if wanted else "a signal to another rank"))
                    break
        except GeneratorExit:   # the script left its for loop: the round it saw last is kept
            if not checkpointed:
                run.checkpoint(self.index - 1, self.trainer, self._extra())
                self._stopped("the script")
            raise
        finally:
            stop.restore()
            self.out.end_bars()
        # Every kept pair so far, as datasets in TRL's formats (replaced as the run goes on).
        on_main(run.accelerator, lambda: export_pairs(run.path, run.path / "dataset", overwrite=True))
        self.callbacks.run_end(self)
        if spent and self.index < cfg.rounds:
            key, what = spent
            self.out.line(f"judge budget spent after round {self.index - 1} ({what}, {key}); checkpoint written; to go "
                          f"on, raise it: oaif resume {run.path} {key}=N")
        elif self.index == cfg.rounds and lengths:
            self.out.line(done_line(cfg.rounds, first, self.policy_version, lengths, run.path))

    def _stopped(self, who: str) -> None:
        self.out.line(f"stopped by {who} after round {self.index - 1}, checkpoint written; resume with: oaif resume "
                      f"{self.run.path}")

    def _round(self, index: int, prompts: list[Prompt], upcoming: list[Prompt] | None) -> Round:
        """One round on every rank, the recipe: rank 0 samples, judges and writes the records;
        every rank trains on the kept pairs; the engine gets the new weights; the policy is
        evaluated when due. upcoming: the next round's prompts (async_rounds draws them now)."""
        t0 = time.perf_counter()
        startup = {k: v for k, v in self.metrics.items() if k.startswith("startup/")}   # the first round's
        self.index, self.metrics = index, {}
        try:
            result = on_main(self.run.accelerator, lambda: self._sample_and_judge(index, prompts, upcoming))
        except ServerGone as e:
            raise self._stopped_before(index, e, "start the server again")
        self.metrics = result.metrics   # every rank sees rank 0's
        self._stop_if_mostly_invalid(index)
        self.metrics |= self._check_alarms(index, self.metrics, BEFORE_TRAINING)
        if result.judged.pairs:
            self.train(result.judged.pairs)
            try:
                self.sync()
            except ServerGone as e:   # the round is trained: _run_rounds ends it (checkpoint), then stops
                self.halt = ServerGone(f"{e}. Round {index} is trained and its checkpoint written; start the "
                                       f"server again, then `oaif resume {self.run.path}`")
        seconds = time.perf_counter() - t0
        # Time in no stage: writing the round's records, moving pairs between ranks.
        overhead = seconds - sum(self.metrics.get(f"{s}/seconds", 0.0) for s in ("generate", "annotate", "train",
                                                                                   "sync"))
        result.metrics = {"round": index, "policy_version": self.policy_version, **self.metrics, **startup,
                          "round/seconds": seconds, "round/overhead_seconds": overhead,
                          "round/pairs_per_s": len(result.judged.pairs) / seconds}
        if self.evaluator is not None and self.evaluator.due(index):
            result.metrics |= self.evaluate(index)
        elif self.evaluator is not None and self.cfg.eval.live_prompts:
            result.metrics |= self.evaluate(index, live=True)
        result.metrics |= self._check_alarms(index, result.metrics, AFTER_TRAINING)
        return result

    def _sample_and_judge(self, index: int, prompts: list[Prompt], upcoming: list[Prompt] | None) -> Round:
        """Rank 0: sample, judge both orders, write the records as each is done. async_rounds: the
        next round's samples are requested now, from the weights the engine holds."""
        prompts = extend_conversations(self.generator, prompts, index, self.metrics)   # generate.turns > 1
        groups = self.generate(prompts)
        if self.cfg.async_rounds and upcoming is not None:
            self.generator.submit(upcoming, index + 1, self.policy_version)
        samples = [s for g in groups for s in g]
        self.run.samples(index, samples)
        judged, rankings = self._annotate(groups)
        table = sample_table(samples, judged.judgments)
        self.run.judged(index, judged, rankings, table)
        if self.judge.proxy_rows is not None:
            self.run.proxy_rows(index, self.judge.proxy_rows)
        return Round(index, judged, rankings, table, self.metrics)

    def _extra(self) -> dict:
        """What a checkpoint keeps besides the trainer: async_rounds' next round's samples (rank 0)."""
        return self.generator.saved() if self.generator is not None else {}

    def _stop_if_mostly_invalid(self, index: int) -> None:
        """annotate.max_invalid_rate: stop before training on what is left; every rank sees rank
        0's metrics."""
        why = self.judge.too_many_invalid(self.metrics, index, self.run.path)
        if why is not None:
            raise self._stopped_before(index, TooManyInvalid(why), "fix the judge")

    def _check_alarms(self, index: int, metrics: dict, checks) -> dict:
        """alarms.*: round `index`'s metrics against the run's so far (oaif/alarms.py), the
        checks read before it is trained on or after; returns alarms/* for its metrics. Every
        trip is recorded and an alarm's first in the run printed. alarms.action=stop: before
        training, the run ends now with the last round's checkpoint; after, once the round is
        written with its checkpoint (self.halt). Every rank sees rank 0's trips."""
        def check() -> tuple[list[Trip], set[str]]:
            history = self.run.metrics_rows()
            trips = tripped(self.cfg.alarms, index, metrics, history, checks)
            if trips:
                self.run.alarms(index, [t.record() for t in trips])
            return trips, {key for row in history for key in row if key.startswith("alarms/")}

        trips, earlier = on_main(self.run.accelerator, check)
        for t in trips:
            if f"alarms/{t.alarm}" not in earlier:
                self.out.line(f"  {t.line()}" + ("" if self.cfg.alarms.action == "stop" else
                                                 f"; later trips only in metrics.jsonl (alarms/{t.alarm})"))
        if trips and self.cfg.alarms.action == "stop":
            why = "; ".join(t.line() for t in trips)
            fix = "read those rounds' samples (oaif report), then change the judge or the bound"
            if checks == BEFORE_TRAINING:
                raise self._stopped_before(index, AlarmStop(why), fix)
            kept = self.run.path / "checkpoints"
            before = [p for p in sorted(kept.glob("round_*")) if p.name < f"round_{index:06d}"]
            self.halt = AlarmStop(
                f"{why}. Round {index} is trained and its checkpoint written (the policy that tripped it); {fix}, then "
                + (f"`oaif resume {self.run.path} --checkpoint {before[-1]}` goes on from the last one before it"
                   if before else f"start again: no checkpoint before round {index} is kept"))
        return {f"alarms/{t.alarm}": 1 for t in trips}

    def _stopped_before(self, index: int, error: RunStopped, fix: str) -> RunStopped:
        """`error`, saying how to go on: nothing of round `index` was trained, so the last
        round's checkpoint (written now if it was not due) is where a resume starts. Every rank."""
        if index == 0:
            return type(error)(f"{error}. {fix[0].upper()}{fix[1:]}, then `oaif resume {self.run.path}` starts again")
        if not (self.run.path / "checkpoints" / f"round_{index - 1:06d}").is_dir():
            self.run.checkpoint(index - 1, self.trainer, self._extra())
        return type(error)(f"{error}. Checkpoint after round {index - 1} is written; {fix}, then "
                           f"`oaif resume {self.run.path}`")
