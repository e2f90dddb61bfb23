"""A run's start, before its first round: every input checked before anything is written,
then the run directory rewound (a resume), the trainer, the policy's engine and judges, and
the evaluator, each timed as startup/* seconds of the first round's metrics.
"""

from __future__ import annotations

import time

from oaif.annotate.backends import build_annotator, check_inputs
from oaif.annotate.stage import AnnotateStage
from oaif.checkpoint import build_trainer, schedule_anchor, schedule_steps
from oaif.config import ConfigError, RunConfig
from oaif.datasets_io import export_pairs, load_prompts
from oaif.distributed import check_distributed, on_main
from oaif.engine import open_policy_engine
from oaif.evaluation import (TRAINING_JUDGE_WARNING, Evaluator, baseline_responses, eval_annotator_config,
                             eval_prompts, max_new_tokens)
from oaif.console import RunConsole
from oaif.generate import Drawn, Generator
from oaif.memory import check_memory
from oaif.models import check_model, policy_tokenizer, resolve_device, resolve_dtype
from oaif.rundir import RunComplete, RunDir, export_stale, run_identity
from oaif.tracking import Trackers, check_trackers


def open_run(cfg: RunConfig, run: RunDir, python, out: RunConsole) -> dict | None:
    """Inputs checked, then the run directory made (or, for a resume, locked and rewound: its
    checkpoint's trainer state is returned), run.log opened, the trackers started."""
    check_run(cfg, run, python, out.line)
    run.identity = run_identity(cfg)
    run.open(cfg)
    out.logs.handler.open(run.path / "run.log" if run.main else None)
    state = rewind(cfg, run, out.line) if run.resume else None
    if run.main and cfg.report_to:
        out.trackers = Trackers(cfg, run.path)
    return state


def check_run(cfg: RunConfig, run: RunDir, python, log) -> None:
    """Bad input fails here, before any engine starts or any file is written; the prompt set and
    the policy's tokenizer it reads are kept in `run`. python: the user's judge given in code
    (annotate.python is then not imported)."""
    if run.prompts is None:
        run.prompts = load_prompts(cfg.prompts, "run.prompts", cfg.prompts_column, cfg.prompts_split)
    check_model(cfg.policy.model, "policy.model")
    run.tokenizer = policy_tokenizer(cfg.policy)   # a model without a chat template is named now, with the fix
    if cfg.eval.every and cfg.eval.baseline:
        check_model(cfg.eval.baseline, "eval.baseline")
    check_inputs(cfg, python=python)
    run.memory_gib = check_memory(cfg, str(resolve_device(cfg.policy.device)))
    check_distributed(cfg, run.accelerator)
    check_trackers(cfg)
    if cfg.eval.every:
        eval_prompts(cfg)
        check_inputs(eval_annotator_config(cfg), "eval.annotate" if cfg.eval.annotate else "annotate")
        if cfg.eval.annotate is None:
            log(TRAINING_JUDGE_WARNING)


def rewind(cfg: RunConfig, run: RunDir, log) -> dict | None:
    """Resume: check the checkpoint against the run and the config, drop what came after
    it; returns its trainer state (None: stopped in its first rounds, round 0 again). A
    finished run whose end-of-run export was cut short gets it redone."""
    try:
        state = run.rewind(cfg, log)
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


def start_parts(cfg: RunConfig, run: RunDir, judge: AnnotateStage, state: dict | None
                ) -> tuple[object, Generator | None, dict]:
    """(the trainer: every rank; the policy's generator: rank 0, else None; startup/* seconds).
    Rank 0 also opens the judge. An engine in its own process builds while the trainer is
    built; an engine started here is closed again if the start fails after it. state: the
    trainer state of the checkpoint resumed from (async_rounds: the samples drawn before it)."""
    g, launched = cfg.generate, run.accelerator is not None
    max_model_len = cfg.policy.max_prompt_tokens + max(g.max_new_tokens, max_new_tokens(cfg))
    engines: list = []
    if run.main and cfg.async_rounds:
        engines.append(open_policy_engine(cfg, max_model_len, run.path / "adapters", launched, wait=False))
    try:
        t0 = time.perf_counter()
        tokenizer = run.tokenizer   # loaded (and checked) by check_run
        trainer = build_trainer(cfg, tokenizer.pad_token_id, schedule_steps(cfg), run.accelerator, run.resume_from)
        startup = {"startup/trainer_seconds": time.perf_counter() - t0,
                   "startup/dtype": resolve_dtype(cfg.policy.dtype),   # what policy.dtype 'auto' chose here
                   "startup/memory_estimate_gib": run.memory_gib}
        t0 = time.perf_counter()

        def open_engine() -> None:   # rank 0; a failure here stops every rank (on_main)
            if not engines:
                engines.append(open_policy_engine(cfg, max_model_len, run.path / "adapters", launched))
            else:
                engines[0].wait_built()   # async_rounds: its own process, built meanwhile
            judge.open(cfg, run.path if run.resume_from else None)

        on_main(run.accelerator, open_engine)
        startup["startup/engine_seconds"] = time.perf_counter() - t0
    except BaseException:
        for engine in engines:
            engine.close()
        raise
    generator = Generator(engines[0], tokenizer, g, cfg.policy.max_prompt_tokens, cfg.seed) if engines else None
    if generator is not None and state and state.get("next_round") is not None:
        generator.pending = Drawn.from_saved(state["next_round"])
    return trainer, generator, startup


def start_evaluator(cfg: RunConfig, run: RunDir, generator: Generator, judge: AnnotateStage, startup: dict
                    ) -> Evaluator:
    """eval.every: the baseline's responses (a fresh run's engine holds the starting policy
    now) and the eval judge (eval.annotate's own, or the training judge); its seconds go to
    startup."""
    t0 = time.perf_counter()
    baseline = baseline_responses(cfg, run.path, generator.engine, generator.tokenizer, fresh=run.resume_from is None)
    annotator = judge.annotator if cfg.eval.annotate is None else build_annotator(eval_annotator_config(cfg))
    startup["startup/eval_seconds"] = time.perf_counter() - t0
    training = judge.annotator if annotator is not judge.annotator and cfg.eval.train_judge else None
    return Evaluator(cfg, run.path, annotator, baseline, training)
