"""Callbacks: a script's hooks into `Loop.rounds()` (and so `oaif.run`).

    def stop_when_short(metrics, loop):          # a plain function is an on_round_end
        return oaif.STOP if metrics["generate/mean_length"] < 20 else None
    oaif.run(cfg, callbacks=[stop_when_short])

Under a launcher every rank calls its own.
"""

from __future__ import annotations

from typing import Protocol

STOP = "stop"   # on_round_end returns it to end the run after this round (checkpointed)
HOOKS = ("on_round_start", "on_round_end", "on_run_end")


class Callback(Protocol):
    """Each method is optional; a plain function is taken as on_round_end."""

    def on_round_start(self, index: int, loop) -> None: ...

    def on_round_end(self, metrics: dict, loop) -> str | None:
        """metrics: the round's line of metrics.jsonl. Return oaif.STOP to end the run after
        this round, with its checkpoint; None to go on."""
        ...

    def on_run_end(self, loop) -> None: ...


class Callbacks:
    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)

    def hooks(self, name: str):
        for cb in self.callbacks:
            if hasattr(cb, name):
                yield getattr(cb, name)
            elif name == "on_round_end" and callable(cb) and not any(hasattr(cb, h) for h in HOOKS):
                yield cb   # a plain function

    def round_start(self, index: int, loop) -> None:
        for hook in self.hooks("on_round_start"):
            hook(index, loop)

    def stop_wanted(self, metrics: dict, loop) -> bool:
        """on_round_end of every callback; whether one asked to stop."""
        wanted = False
        for hook in self.hooks("on_round_end"):
            said = hook(metrics, loop)
            if said not in (None, STOP):
                raise TypeError(f"callback {getattr(hook, '__qualname__', hook)!r} returned {said!r}: return "
                                f"oaif.STOP to end the run after this round, or None to go on")
            wanted |= said == STOP
        return wanted

    def run_end(self, loop) -> None:
        for hook in self.hooks("on_run_end"):
            hook(loop)
