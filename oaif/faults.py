"""Crash points for the kill drill (scripts/fault_drill.py).

`OAIF_CRASH_AT=NAME:N` makes the process SIGKILL itself the Nth time it reaches the point
NAME: a crash at a chosen moment, which no real fault can be made to produce on demand.
Unset (always, outside the drill), a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

POINTS = ("generate", "annotate", "train", "sync", "metrics", "checkpoint")
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
