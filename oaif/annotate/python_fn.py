"""The `python` backend: your own judge, as a plain function (or any object with the
annotator Protocol).

    def judge(prompt_messages, response_1, response_2) -> float | None:
        '''P(response_1 is better than response_2); None when it cannot judge.'''

or, to see a whole round at once (a batch for a model, one request to a service):

    @oaif.batched
    def judge(prompts, responses_1, responses_2) -> list[float | None]

It is asked like every backend: each pair in both orders, only agreeing pairs kept, the
same cache, mix weights and metrics. None is "cannot judge". An exception, NaN, a number
outside [0, 1] or anything that is not a number is an invalid answer whose error is kept in
the judgment record; the round goes on (up to annotate.max_invalid_rate).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Callable

from oaif.annotate.base import Answer, Identity, JudgeRequest, JudgeTemplate
from oaif.config import ConfigError
from oaif.constitution import Constitution


def batched(fn: Callable) -> Callable:
    """Marks a judge that takes lists (prompts, responses_1, responses_2) and returns a list."""
    fn.oaif_batched = True
    return fn


def load_target(spec: str, key: str) -> Any:
    """'module:attribute' or 'path/to/file.py:attribute' -> the object; ConfigError naming `key`."""
    module, sep, attr = spec.rpartition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"{key}: expected 'module:function' or 'path/to/file.py:function', got {spec!r}")
    if module == "__main__":   # oaif.run(cfg, annotator=f) from a script: only that script has f
        raise ConfigError(f"{key}: {spec} was defined in the script that started the run; run that script "
                          f"again, passing it: oaif.resume(run_dir, annotator={attr})")
    try:
        if module.endswith(".py"):
            path = Path(module)
            if not path.is_file():
                raise ConfigError(f"{key}: file {module} not found")
            # Imported once per file, as `import` does a module: check_inputs and build_annotator
            # both load the target, and the user's module (which may load a model) runs once.
            name = f"oaif_judge_{path.stem}"
            mod = sys.modules.get(name)
            if mod is None or Path(mod.__file__).resolve() != path.resolve():
                loader = importlib.util.spec_from_file_location(name, path)
                mod = importlib.util.module_from_spec(loader)
                loader.loader.exec_module(mod)
                sys.modules[name] = mod
        else:
            # `python -m` puts the working directory on the path, the `oaif` script does not:
            # make `annotate.python: myjudge:judge` mean ./myjudge.py either way.
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.append(os.getcwd())
            mod = importlib.import_module(module)
    except ConfigError:
        raise
    except Exception as e:   # the user's module failed to import: say which and why
        raise ConfigError(f"{key}: importing {module} failed: {type(e).__name__}: {e}") from None
    target = mod
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{key}: {module} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target) and not callable(getattr(target, "judge", None)):
        raise ConfigError(f"{key}: {spec} is neither a function nor an annotator (an object with judge(requests))")
    return target


def name_of(target: Any) -> str:
    """'module:qualname' of a function, or of an annotator object's class."""
    obj = target if inspect.isfunction(target) or inspect.ismethod(target) else type(target)
    return f"{obj.__module__}:{obj.__qualname__}"


def probability(value: Any) -> tuple[float | None, str]:
    """(p, "") for a probability in [0, 1]; (None, why not) for anything else."""
    if value is None:
        return None, "cannot judge (None)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None, f"returned {type(value).__name__} {value!r:.80}, not a probability (a float in [0, 1])"
    p = float(value)
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        return None, f"returned {p}, not a probability in [0, 1]"
    return p, ""


class FunctionAnnotator:
    """A user function as an annotator. identity.model is its 'module:qualname' and
    identity.template_hash a hash of its source, so an edited function gets new cache keys."""

    def __init__(self, fn: Callable, constitution: Constitution):
        self.fn, self.constitution = fn, constitution
        self.batched = bool(getattr(fn, "oaif_batched", False))
        self.name = name_of(fn)
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):   # defined in a REPL or built at run time
            source = self.name
        self.source_hash = hashlib.sha256(source.encode()).hexdigest()[:16]
        self.stats: dict[str, float] = {"requests": 0, "errors": 0}

    @property
    def identity(self) -> Identity:
        c = self.constitution
        return Identity("python", self.name, c.name, c.hash, self.source_hash)

    def use_constitution(self, constitution: Constitution, template: JudgeTemplate) -> None:
        self.constitution = constitution   # only the records change: the function reads no constitution

    def judge(self, requests: list[JudgeRequest]) -> list[Answer]:
        self.stats["requests"] += len(requests)
        if not self.batched:
            return [self._call(r) for r in requests]
        try:
            values = list(self.fn([r.messages for r in requests], [r.first for r in requests],
                                  [r.second for r in requests]))
            if len(values) != len(requests):
                raise ValueError(f"returned {len(values)} values for {len(requests)} pairs")
        except Exception as e:   # the user's code: whatever it raises is an invalid answer, kept
            self.stats["errors"] += len(requests)
            return [Answer(None, f"error: {type(e).__name__}: {e}"[:500])] * len(requests)
        return [self._read(v) for v in values]

    def _call(self, r: JudgeRequest) -> Answer:
        try:
            return self._read(self.fn(r.messages, r.first, r.second))
        except Exception as e:
            self.stats["errors"] += 1
            return Answer(None, f"error: {type(e).__name__}: {e}"[:500])

    def _read(self, value: Any) -> Answer:
        p, why = probability(value)
        return Answer(p, f"{self.name} -> {p:g}") if p is not None else Answer(None, f"invalid: {why}")
