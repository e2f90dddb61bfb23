"""A judgment cache, so a repeated or resumed run does not pay for the same judgment twice.

Keyed by everything that decides an answer: the annotator's identity (backend, model,
constitution hash, template hash), the judging settings (labels, chain of thought, ...),
the conversation and the two responses in their order. Only valid answers are stored: a
timeout or a 429 today should be asked again tomorrow. The file is JSONL, one whole line
appended per answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from oaif.annotate.base import Annotator, Answer, JudgeRequest
from oaif.records import append_jsonl, read_jsonl


def model_fingerprint(model: str) -> str:
    """What a local judge model folder holds, cheaply: its config and, per weight file, the
    name, size and first and last MiB (a retrained or replaced model at the same path gets
    a new key). A hub id is its own fingerprint."""
    path = Path(model)
    if not path.is_dir():
        return model
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def read_cache(path: Path) -> list[dict]:
    """The cache's rows. A last line without its newline is an append cut short (a crash in
    the middle of a write): it is dropped and cut from the file, so the run goes on and the
    next append starts a clean line. A bad line anywhere else is an error naming it."""
    if not path.is_file():
        return []
    complete, _, torn = path.read_bytes().rpartition(b"\n")
    if torn:
        with open(path, "r+b") as f:
            f.truncate(len(complete) + 1 if complete else 0)
        print(f"oaif: judgment cache {path}: dropped a torn last line (a write cut short); "
              f"that judgment is asked again", file=sys.stderr)
    return read_jsonl(path)


class CachedAnnotator:
    def __init__(self, inner: Annotator, path: str | Path, settings: dict):
        self.inner, self.path, self.settings = inner, Path(path), settings
        # Lines written before label mass was recorded have none.
        self.entries = {row["key"]: Answer(row["p_first"], row["raw"], row.get("label_mass"))
                        for row in read_cache(self.path)}
        self.hits = self.misses = 0

    @property
    def stats(self) -> dict[str, float]:
        return {**self.inner.stats, "cache_hits": self.hits, "cache_misses": self.misses}

    @property
    def identity(self):   # the inner judge's, which follows a reloaded constitution
        return self.inner.identity

    def close(self) -> None:
        from oaif.annotate.select import close_annotator

        close_annotator(self.inner)

    def key(self, r: JudgeRequest, settings: str) -> str:
        text = json.dumps([settings, r.messages, r.first, r.second, r.principles])
        return hashlib.sha256(text.encode()).hexdigest()

    def judge(self, requests: list[JudgeRequest]) -> list[Answer]:
        settings = json.dumps({"identity": dataclasses.asdict(self.identity), **self.settings}, sort_keys=True)
        keys = [self.key(r, settings) for r in requests]
        todo = [i for i, k in enumerate(keys) if k not in self.entries]
        self.hits += len(requests) - len(todo)
        self.misses += len(todo)
        fresh = self.inner.judge([requests[i] for i in todo]) if todo else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for i, answer in zip(todo, fresh):
            if answer.p_first is not None and keys[i] not in self.entries:   # a request twice in one batch: one line
                self.entries[keys[i]] = answer
                append_jsonl(self.path, {"key": keys[i], "p_first": answer.p_first, "raw": answer.raw,
                                          "label_mass": answer.label_mass})
        answers = dict(zip(todo, fresh))
        return [answers[i] if i in answers else self.entries[k] for i, k in enumerate(keys)]
