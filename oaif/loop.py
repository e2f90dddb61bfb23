"""The OAIF loop: generate → annotate (both orders) → train (online DPO) → sync, per round.

    oaif run configs/tiny_cpu.yaml [key=value ...]
    oaif resume runs/NAME [key=value ...]      (continue from the latest checkpoint)

Each round samples from the policy as it is *now* (the engine holds the weights of the
last sync), so the preference data is always on-policy (OAIF, Guo et al. 2024, Alg. 1).
A round reads as data flowing through the stages: prompts → groups of samples (generate.py)
→ judgments and kept pairs (annotate/stage.py) → train metrics (train.py) → the engine's new
weights (engine/); the run directory (rundir.py) is its only writer.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Iterator, Protocol

from oaif.annotate.base import close_annotator
from oaif.annotate.judge import Judged, label_mass_warning
from oaif.annotate.select import build_annotator, check_inputs, with_python_annotator
from oaif.annotate.stage import AnnotateStage
from oaif.checkpoint import build_trainer, schedule_anchor, schedule_steps
from oaif.config import ConfigError, RunConfig, RunStopped
from oaif.console import GracefulStop, RunConsole, format_row, header
from oaif.conversation import extend_conversations
from oaif.datasets_io import export_pairs, load_prompts
from oaif.distributed import check_distributed, end, gathered_state_dict, make_accelerator, on_main, stop_agreed
from oaif.engine import open_policy_engine
from oaif.evaluation import (TRAINING_JUDGE_WARNING, Evaluator, baseline_responses, eval_annotator_config,
                             eval_prompts, format_summary)
from oaif.evaluation import max_new_tokens as eval_max_new_tokens
from oaif.faults import crash_point
from oaif.generate import Drawn, Generator, check_model, load_tokenizer
from oaif.records import PreferencePair, Prompt, Sample, as_prompts
from oaif.rundir import RunComplete, RunDir, export_stale, resume_config, run_identity
from oaif.tracking import Trackers, check_trackers, markdown_table, sample_table


class TooManyInvalid(RunStopped):
    pass


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


@dataclasses.dataclass
class Round:
    """What one round made: its samples, judgments, kept pairs and per-prompt rankings, the
    sample table the trackers show, and its metrics (the round's line of metrics.jsonl)."""
    index: int
    groups: list[list[Sample]]
    judged: Judged
    rankings: list
    metrics: dict


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
    (rounds() does) and add to `metrics`, the metrics of the round `index`.
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
        given = as_prompts(prompts) if prompts is not None else None
        if given is not None and resume_dir is None:   # saved with the run: the config names the saved copy
            cfg = dataclasses.replace(cfg, prompts=str(Path(cfg.output_dir) / cfg.name / "prompts.jsonl"),
                                      prompts_column="", prompts_split="train")
        self.cfg, self.callbacks, self.out = cfg, list(callbacks), RunConsole(log)
        self.run = RunDir(resume_dir or Path(cfg.output_dir) / cfg.name, resume=resume_dir is not None,
                          checkpoint=checkpoint, prompts=given)
        self.judge = AnnotateStage(cfg.annotate, python=annotator)   # its annotator is built on entering
        self.generator: Generator | None = None
        self.trainer = None
        self.evaluator: Evaluator | None = None   # eval.every > 0: the policy against its start, held out
        self.index = 0        # the round in progress, or the next one
        self.metrics: dict = {}   # the stages' metrics of the round in progress (scripts calling them)
        self._rounds = None

    # What scripts read.

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def prompts(self) -> list[Prompt]:
        return self.run.prompts

    @property
    def tokenizer(self):
        return self.generator.tokenizer

    @property
    def policy_version(self) -> int:
        return self.trainer.version

    def log(self, line: str) -> None:
        """One of oaif's own lines: to the terminal (above the bars) and to run.log; rank 0."""
        self.out.line(line)

    # Start and end.

    def __enter__(self) -> "Loop":
        t0 = time.perf_counter()
        try:
            self.run.accelerator = make_accelerator()
            self.out.open(self.cfg.verbose, self.run.main)
            self._check_inputs()
            startup = self._open()
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

    def _check_inputs(self) -> None:
        """Bad input fails here, before any engine starts or any file is written."""
        cfg = self.cfg
        if self.run.prompts is None:
            self.run.prompts = load_prompts(cfg.prompts, "run.prompts", cfg.prompts_column, cfg.prompts_split)
        check_model(cfg.policy.model, "policy.model")
        if cfg.eval.every and cfg.eval.baseline:
            check_model(cfg.eval.baseline, "eval.baseline")
        check_inputs(cfg, python=self.judge.python)
        check_distributed(cfg, self.run.accelerator)
        check_trackers(cfg)
        if cfg.eval.every:
            eval_prompts(cfg)
            check_inputs(eval_annotator_config(cfg), "eval.annotate" if cfg.eval.annotate else "annotate")
            if cfg.eval.annotate is None:
                self.log(TRAINING_JUDGE_WARNING)

    def _open(self) -> dict:
        """The run directory, the trainer, the engine and the judges; returns startup/* seconds."""
        cfg, run = self.cfg, self.run
        run.identity = run_identity(cfg)
        run.open(cfg)
        self.out.logs.handler.open(run.path / "run.log" if run.main else None)
        state = self._rewind() if run.resume else None
        self.index = state["round"] + 1 if state else 0
        if run.main and cfg.report_to:
            self.out.trackers = Trackers(cfg, run.path)
        startup = self._start_engines()
        if state and state.get("next_round") is not None:   # async_rounds: samples drawn before the checkpoint
            self.generator.pending = Drawn.from_saved(state["next_round"])
        if cfg.eval.every:   # single process (check_distributed refuses it under a launcher)
            t0 = time.perf_counter()
            baseline = baseline_responses(cfg, run.path, self.generator.engine, self.tokenizer,
                                          fresh=run.resume_from is None)
            judge = self.judge.annotator if cfg.eval.annotate is None else build_annotator(eval_annotator_config(cfg))
            self.evaluator = Evaluator(cfg, run.path, judge, baseline)
            startup["startup/eval_seconds"] = time.perf_counter() - t0
        return startup

    def _rewind(self) -> dict | None:
        """Resume: check the checkpoint against the run and the config, drop what came after
        it; returns its trainer state (None: stopped in its first rounds, round 0 again). A
        finished run whose end-of-run export was cut short gets it redone."""
        cfg, run = self.cfg, self.run
        try:
            state = run.rewind(cfg, self.log)
        except RunComplete as e:
            if export_stale(run.path):
                on_main(run.accelerator, lambda: export_pairs(run.path, run.path / "dataset", overwrite=True))
                e.redone = True
            raise
        anchor = schedule_anchor(cfg.train, state, schedule_steps(cfg)) if state else None
        if anchor and anchor[1] == 0.0 and cfg.train.lr_schedule != "constant":
            raise ConfigError(f"train.lr_schedule: the {cfg.train.lr_schedule} schedule had reached 0 at "
                              f"{run.resume_from.name}, so more rounds would train nothing; resume with "
                              f"train.lr_schedule=constant (at train.learning_rate) to go on")
        return state

    def _start_engines(self) -> dict:
        """The trainer (every rank) and, on rank 0, the policy's engine and the judge. The
        first round must sample from the policy as it starts: an in-process engine holds the
        base weights (wrong when starting from an adapter or resuming); a server may hold
        anything (an earlier run's). Returns startup/* seconds."""
        cfg, run, g = self.cfg, self.run, self.cfg.generate
        max_model_len = cfg.policy.max_prompt_tokens + max(g.max_new_tokens, eval_max_new_tokens(cfg))
        engine = None
        under_launcher = run.accelerator is not None
        if run.main and cfg.async_rounds:   # its own process, building while the trainer is built here
            engine = open_policy_engine(cfg, max_model_len, run.path / "adapters", under_launcher, wait=False)
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(cfg.policy.model)
        self.trainer = build_trainer(cfg, tokenizer.pad_token_id, schedule_steps(cfg), run.accelerator,
                                     run.resume_from)
        startup = {"startup/trainer_seconds": time.perf_counter() - t0}
        t0 = time.perf_counter()

        def engines() -> bool:   # rank 0: whether the engine needs the weights now
            nonlocal engine
            engine = engine or open_policy_engine(cfg, max_model_len, run.path / "adapters", under_launcher)
            self.generator = Generator(engine, tokenizer, g, cfg.policy.max_prompt_tokens, cfg.seed)
            self.judge.open(cfg)
            return bool(cfg.train.lora.adapter or run.resume_from or g.server_url or under_launcher)

        if on_main(run.accelerator, engines):
            self.sync()
        startup["startup/engine_seconds"] = time.perf_counter() - t0
        return startup

    # The stages. One process (rank 0 under a launcher for generate and annotate).

    def generate(self, prompts) -> list[list[Sample]]:
        """generate.samples_per_prompt samples per prompt from the policy the engine holds,
        seeded by (seed, round, place): one group per prompt (prompts over
        policy.max_prompt_tokens are skipped and counted). With async_rounds, the samples
        requested for this round during the last one."""
        t0 = time.perf_counter()
        prompts = as_prompts(prompts)
        self.out.progress.start("generate", len(prompts) * self.cfg.generate.samples_per_prompt, "sample")
        groups, metrics = self.generator.sample(prompts, self.index, self.policy_version)
        self.out.progress.advance(sum(len(g) for g in groups))
        self._add("generate", t0, metrics)
        return groups

    def annotate(self, groups: list[list[Sample]]) -> Judged:
        """Compare each group's samples in both orders (annotate.ranking: consecutive pairs, or
        a ranking of all n); Judged.pairs are the pairs to train on. With
        annotate.reload_constitution an edited constitution is taken up first."""
        return self._annotate(groups)[0]

    def _annotate(self, groups: list[list[Sample]]) -> tuple[Judged, list]:
        t0 = time.perf_counter()
        for line in self.judge.reload():
            self.log(f"  round {self.index}: {line}")
        self.out.progress.start("annotate", len(groups), "prompt")
        judged, rankings, metrics = self.judge(groups, self.index, self.policy_version)
        self.out.progress.advance(len(groups))
        self._add("annotate", t0, metrics)
        return judged, rankings

    def train(self, pairs: list[PreferencePair]) -> dict:
        """train.epochs_per_round passes of the configured loss over `pairs`; the policy
        version goes up (sync() then makes the engine sample from it)."""
        t, t0 = self.cfg.train, time.perf_counter()
        self.out.progress.start("train", t.epochs_per_round * math.ceil(len(pairs) / t.batch_size), "step")
        metrics = self.trainer.train_round(pairs, on_step=self.out.progress.advance)
        self._add("train", t0, metrics)
        return metrics

    def sync(self) -> float:
        """Make the engine sample from the trainer's current policy; returns seconds. Every
        rank calls it (a sharded policy's weights are gathered first); rank 0 pushes."""
        crash_point("sync")
        self.out.progress.start("sync", 1, "push")
        t0 = time.perf_counter()
        trainer, accelerator = self.trainer, self.run.accelerator
        # A server loads a saved copy: a policy sharded across ranks is gathered by every rank first.
        to_server = self.cfg.generate.server_url or accelerator is not None
        state = gathered_state_dict(accelerator, trainer.model) if to_server and not self.cfg.train.lora.enabled \
            else None
        on_main(accelerator, lambda: self.generator.engine.load_weights(trainer.policy, trainer.version,
                                                                                  state))
        self.out.progress.advance()
        return self._add("sync", t0, {})

    def evaluate(self, index: int) -> dict:
        """eval/* metrics of the policy the engine holds now (one process)."""
        self.out.progress.start("eval", 1, "evaluation")
        t0 = time.perf_counter()
        self.generator.drawn()   # async_rounds: the engine answers in order; the next round's samples first
        metrics = self.evaluator(self.generator.engine, self.tokenizer, self.trainer, index, self.policy_version)
        return metrics | {"eval/seconds": time.perf_counter() - t0}

    def _add(self, stage: str, t0: float, metrics: dict) -> float:
        """A stage's metrics and seconds into the round in progress's (a script may call a
        stage twice: its seconds add up); returns the seconds."""
        seconds = time.perf_counter() - t0
        self.metrics |= metrics
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
        cfg, run = self.cfg, self.run
        batches = round_prompts(self.prompts, cfg.prompts_per_round, cfg.seed)
        for _ in range(self.index):   # the prompts the done rounds used
            next(batches)
        first, lengths, checkpointed = self.index, [], True
        stop = GracefulStop()   # under a launcher every rank gets the signal (the launcher forwards it)
        self.out.bars(first, cfg.rounds)
        try:
            processes = run.accelerator.num_processes if run.accelerator else 0
            self.log(f"run directory: {run.path}" + (f" ({processes} processes)" if processes else ""))
            self.log(header())
            upcoming = next(batches)
            for index in range(first, cfg.rounds):
                for hook in self._hooks("on_round_start"):
                    hook(index, self)
                prompts, upcoming = upcoming, next(batches)
                result = self._round(index, prompts, upcoming if index + 1 < cfg.rounds else None)
                metrics = result.metrics
                wanted = self._stop_wanted(metrics)
                stopping = stop_agreed(bool(stop) or wanted, run.accelerator)
                checkpointed = run.finish(cfg, index, self.trainer, self.tokenizer, self.policy_version, metrics,
                                          last=index == cfg.rounds - 1 or stopping, extra=self._checkpoint_extra)
                self._show(result, first_round=index == first)
                lengths.append(metrics["generate/mean_length"])
                self.index, self.metrics = index + 1, {}
                yield metrics
                if stopping and index < cfg.rounds - 1:
                    who = stop.signal or ("a callback (oaif.STOP)" if wanted else "a signal to another rank")
                    self.log(f"stopped by {who} after round {index}, checkpoint written; resume with: "
                             f"oaif resume {run.path}")
                    break
        except GeneratorExit:   # the script left its for loop: the round it saw last is kept
            if not checkpointed:
                run.checkpoint(self.index - 1, self.trainer, self.tokenizer, self.policy_version,
                               self._checkpoint_extra())
                self.log(f"stopped by the script after round {self.index - 1}, checkpoint written; resume with: "
                         f"oaif resume {run.path}")
            raise
        finally:
            stop.restore()
            self.out.end_bars()
        # Every kept pair so far, as datasets in TRL's formats (replaced as the run goes on).
        on_main(run.accelerator, lambda: export_pairs(run.path, run.path / "dataset", overwrite=True))
        for hook in self._hooks("on_run_end"):
            hook(self)
        if self.index == cfg.rounds and lengths:
            fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731 (None: every prompt of a round was too long)
            self.log(f"done: {cfg.rounds} rounds" + (f" (resumed after round {first - 1})" if first else "")
                     + f", policy version {self.policy_version}; mean response length "
                     f"{fmt(lengths[0])} -> {fmt(lengths[-1])} tokens; records and metrics.jsonl in {run.path}")

    def _round(self, index: int, prompts: list[Prompt], upcoming: list[Prompt] | None) -> Round:
        """One round on every rank, the recipe: rank 0 samples, judges and writes the round's
        records; every rank trains on the kept pairs; the engine gets the new weights; the
        policy is evaluated when due. upcoming: the next round's prompts (async_rounds samples
        them while this round trains)."""
        t0 = time.perf_counter()
        startup = {k: v for k, v in self.metrics.items() if k.startswith("startup/")}   # the first round's
        self.index, self.metrics = index, {}
        result = on_main(self.run.accelerator, lambda: self._sample_and_judge(index, prompts, upcoming))
        self.metrics = result.metrics   # every rank sees rank 0's
        self._stop_if_mostly_invalid(index)
        if result.judged.pairs:
            self.train(result.judged.pairs)
            self.sync()
        seconds = time.perf_counter() - t0
        # Time in no stage: writing the round's records, moving pairs between ranks.
        overhead = seconds - sum(self.metrics.get(f"{s}/seconds", 0.0) for s in STAGES)
        result.metrics = {"round": index, "policy_version": self.policy_version, **self.metrics, **startup,
                          "round/seconds": seconds, "round/overhead_seconds": overhead,
                          "round/pairs_per_s": len(result.judged.pairs) / seconds}
        every = self.cfg.eval.every
        if every and ((index + 1) % every == 0 or index == self.cfg.rounds - 1):
            result.metrics |= self.evaluate(index)
        return result

    def _sample_and_judge(self, index: int, prompts: list[Prompt], upcoming: list[Prompt] | None) -> Round:
        """Rank 0: sample, judge both orders, write the round's records as each is done.
        async_rounds: the next round's samples are requested as soon as this round's are in,
        from the weights the engine holds (this round's training is pushed after them)."""
        prompts = extend_conversations(self.generator, prompts, index, self.metrics)   # generate.turns > 1
        groups = self.generate(prompts)
        if self.cfg.async_rounds and upcoming is not None:
            self.generator.submit(upcoming, index + 1, self.policy_version)
        samples = [s for g in groups for s in g]
        self.run.write(index, "samples.jsonl", samples)
        crash_point("generate")
        judged, rankings = self._annotate(groups)
        self.run.write(index, "judgments.jsonl", judged.judgments)
        crash_point("annotate")
        self.run.write(index, "pairs.jsonl", judged.pairs)
        if rankings:
            self.run.write(index, "rankings.jsonl", rankings)
        (self.run.path / "rounds" / f"{index:06d}" / "samples.md").write_text(
            markdown_table(sample_table(samples, judged.judgments)))
        return Round(index, groups, judged, rankings, self.metrics)

    def _stop_if_mostly_invalid(self, index: int) -> None:
        """annotate.max_invalid_rate: stop before training on what is left. Every rank sees rank
        0's metrics and stops alike; nothing of this round was trained, so the last round's
        state is whole and is what a resume continues from."""
        invalid, ceiling, run = self.metrics.get("annotate/invalid_rate"), self.cfg.annotate.max_invalid_rate, self.run
        if invalid is None or invalid <= ceiling:
            return
        why = (f"round {index}: {invalid:.0%} of the judged pairs got an invalid judgment (> annotate.max_invalid_rate "
               f"{ceiling:g}), so the round was not trained on; the judge's raw answers are in "
               f"{run.path / 'rounds' / f'{index:06d}' / 'judgments.jsonl'}")
        if index == 0:
            raise TooManyInvalid(f"{why}. Fix the judge, then `oaif resume {run.path}` starts again")
        if not (run.path / "checkpoints" / f"round_{index - 1:06d}").is_dir():
            run.checkpoint(index - 1, self.trainer, self.tokenizer, self.policy_version, self._checkpoint_extra())
        raise TooManyInvalid(f"{why}. Checkpoint after round {index - 1} is written; fix the judge, then "
                             f"`oaif resume {run.path}`")

    def _checkpoint_extra(self) -> dict:
        """What a checkpoint keeps besides the trainer and the run's identity: with
        async_rounds, the next round's samples. Those were drawn from the weights before this
        round's update; a resume could not draw them again (the checkpoint holds the newer
        weights), so they are collected now and saved."""
        drawn = self.generator.drawn() if self.generator is not None else None
        return {"next_round": drawn.saved()} if drawn is not None else {}

    def _show(self, result: Round, first_round: bool) -> None:
        """A finished round to the trackers and the terminal."""
        metrics = result.metrics
        if self.out.trackers is not None:
            self.out.trackers.log(metrics, sample_table([s for g in result.groups for s in g],
                                                        result.judged.judgments))
        self.out.progress.round_done()
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
    """`oaif resume` of a run of the loop: continue it from `checkpoint` (default: its
    latest); anything recorded after it is dropped and redone. overrides: key=value on its
    saved config."""
    run_dir = Path(run_dir)
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
