"""The garbage collector in a process oaif owns from start to exit: the `oaif` command and
the async engine's process (a script or test that calls oaif keeps its own settings).

Importing torch, transformers and vLLM leaves millions of long-lived objects. Python's default
threshold (a collection every 700 allocations) rescans them again and again while the engine
and models are built, and once more at exit: together 4-5 s of a 16 s tiny run on a 2-core
CPU. Collections stay on, so a long run's cyclic garbage is still freed, only less often;
at exit the heap is frozen instead of scanned, since the process gives all of its memory back.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def owned_process() -> Iterator[None]:
    gc.set_threshold(10_000, 10, 10)
    try:
        yield
    finally:
        gc.freeze()
