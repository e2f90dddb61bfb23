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

from pathlib import Path

from oaif import loop
from oaif.annotate.base import Annotator, Answer, Identity, JudgeRequest
from oaif.annotate.offline import annotate_pairs
from oaif.annotate.python_fn import batched
from oaif.best_of_n import best_of_n
from oaif.config import ConfigError, RunConfig, RunStopped, load_config
from oaif.evaluation import run_eval as evaluate
from oaif.loop import STOP, Callback, Loop, run
from oaif.offline import resume_offline
from oaif.rundir import is_offline_run


def resume(run_dir, overrides: list[str] = (), *, checkpoint=None, annotator=None, callbacks=(), log=print):
    """`oaif resume`: a run of the loop goes on from `checkpoint` (default: its latest), a run of
    `oaif offline` in its trainer; anything recorded after the checkpoint is dropped and redone.
    overrides: key=value on its saved config. Returns the run directory."""
    if is_offline_run(Path(run_dir)):
        return resume_offline(Path(run_dir), overrides, checkpoint=Path(checkpoint) if checkpoint else None, log=log)
    return loop.resume(run_dir, overrides, checkpoint=checkpoint, annotator=annotator, callbacks=callbacks, log=log)

__all__ = [
    "load_config", "run", "resume", "Loop", "Callback", "STOP", "annotate_pairs", "evaluate", "best_of_n", "batched",
    "Annotator", "Answer", "Identity", "JudgeRequest", "RunConfig", "ConfigError", "RunStopped",
]
