"""Crash points for the kill drill (scripts/fault_drill.py).

`OAIF_CRASH_AT=NAME:N` makes the process SIGKILL itself the Nth time it reaches the point
NAME: a crash at a chosen moment, which no real fault can be made to produce on demand.
Unset (always, outside the drill), a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

# Each named where it is placed; a point may be reached several times per process (N picks which).
POINTS = (
    "generate",    # loop.py: the round's samples are written, nothing judged yet
    "annotate",    # loop.py: the judgments are written, the pairs not yet
    "train",       # train.py: after an optimizer step
    "sync",        # loop.py: before the weight sync
    "sync_push",   # half-way through the push: sync.py (in-process engine: loaded, prefix cache not reset;
                   # vllm_lora: adapter saved, not handed over), actor.py (weights in shared memory, the
                   # engine process not told to load them), server.py (path: saved and the server paused, no
                   # reload), transfer.py (wire: the server paused and a first chunk of the weights sent)
    "metrics",     # rundir.py: after the metrics line
    "checkpoint",  # checkpoint.py: half-way through a checkpoint's save
    "prune",       # checkpoint.py: the new checkpoint renamed into place, the older ones not yet deleted
    "evaluate",    # evaluation.py: the evaluation's comparisons written, its metrics line not yet
    "export",      # datasets_io.py: the end-of-run pairs export, after the 1st (N=1) or 2nd (N=2) dataset
    "report",      # report.py: after the plots (N=1); between swapping out the old report and renaming in the new (N=2)
)
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("OAIF_CRASH_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target == name:
        _reached[name] = _reached.get(name, 0) + 1
        if _reached[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
