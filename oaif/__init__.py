"""oaif: align a language model with online AI feedback.

    import oaif

    cfg = oaif.load_config("configs/tiny_cpu.yaml", ["rounds=4"])
    run_dir = oaif.run(cfg)                          # what `oaif run` does

    def judge(prompt_messages, response_1, response_2):   # your own annotator
        return 1.0 if len(response_1) < len(response_2) else 0.0
    oaif.run(cfg, annotator=judge)

    with oaif.Loop(cfg) as loop:                     # round by round
        for metrics in loop.rounds():
            ...

The `oaif` command is a thin layer over these functions (oaif/cli.py).
"""

from __future__ import annotations

from pathlib import Path

from oaif.annotate.base import Annotator, Answer, Identity, JudgeRequest
from oaif.annotate.files import annotate_pairs
from oaif.annotate.python_fn import batched
from oaif.pipeline.best_of_n import best_of_n
from oaif.config import ConfigError, RunConfig, RunStopped, load_config
from oaif.evaluation import run_eval as evaluate
from oaif.callbacks import STOP, Callback
from oaif.loop import Loop
from oaif.pipeline.offline import resume_offline
from oaif.rundir import RunComplete, is_offline_run, resume_config


def run(cfg: RunConfig, *, annotator=None, prompts=None, callbacks=(), log=print) -> Path:
    """Every round of a new run (`oaif run`); returns its run directory."""
    with Loop(cfg, annotator=annotator, prompts=prompts, callbacks=callbacks, log=log) as loop:
        for _ in loop.rounds():
            pass
    return loop.run_dir


def resume(run_dir: str | Path, overrides: list[str] = (), *, checkpoint: str | Path | None = None, annotator=None,
           callbacks=(), log=print) -> Path:
    """`oaif resume`: a run of the loop goes on from `checkpoint` (default: its latest), a run of
    `oaif offline` in its trainer; anything recorded after the checkpoint is dropped and redone.
    overrides: key=value on its saved config. Returns the run directory."""
    run_dir, checkpoint = Path(run_dir), Path(checkpoint) if checkpoint else None
    if is_offline_run(run_dir):
        return resume_offline(run_dir, overrides, checkpoint=checkpoint, log=log)
    cfg = resume_config(run_dir, overrides)
    try:
        with Loop(cfg, annotator=annotator, callbacks=callbacks, resume_dir=run_dir, checkpoint=checkpoint,
                  log=log) as loop:
            for _ in loop.rounds():
                pass
    except RunComplete as e:
        if not e.redone:
            raise
        log(f"{e}; its end-of-run export (cut short) is redone: {run_dir / 'dataset'}")
    return run_dir

__all__ = [
    "load_config", "run", "resume", "Loop", "Callback", "STOP", "annotate_pairs", "evaluate", "best_of_n", "batched",
    "Annotator", "Answer", "Identity", "JudgeRequest", "RunConfig", "ConfigError", "RunStopped",
]
