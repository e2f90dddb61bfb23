"""A judgment cache, so a repeated or resumed run does not pay for the same judgment twice.

Keyed by everything that decides an answer: the annotator's identity (backend, model,
constitution hash, template hash), the judging settings (labels, chain of thought, ...),
the conversation and the two responses in their order. Only valid answers are stored: a
timeout or a 429 today should be asked again tomorrow. The file is JSONL: the header line
{"oaif_judgment_cache": 1}, which tells a cache from any other file, then one whole line
appended per answer. A file without the header whose first line is a cache row is a cache
written before the header existed: read and appended to as it is. Runs may share a cache:
appends and the repair of a torn last line hold an advisory lock (flock) on it, so one run
never cuts a line another is writing.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from oaif.annotate.base import Annotator, Answer, JudgeRequest, close_annotator
from oaif.annotate.mix import MixAnnotator
from oaif.records import append_jsonl

HEADER = {"oaif_judgment_cache": 1}
HEADER_LINE = json.dumps(HEADER).encode()
ROW = ("key", "p_first", "raw")


@contextmanager
def locked(path: Path, create: bool = False):
    """The cache file under an exclusive advisory lock, released when the block ends (or the
    process dies)."""
    fd = os.open(path, os.O_RDONLY | (os.O_CREAT if create else 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def cache_rows(path: Path, data: bytes) -> list[dict]:
    """The rows of a cache file's whole lines; an error naming annotate.cache and the path for a
    file that is not a cache, naming the line for a bad row."""
    lines = [(n, line) for n, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    rows = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if n == 1 and row == HEADER:
            continue
        if not (isinstance(row, dict) and all(k in row for k in ROW)):
            if n == lines[0][0]:   # neither the header nor a row written before it: not a cache at all
                raise ValueError(f"annotate.cache: {path} is not an oaif judgment cache (its first line is not "
                                 f"{HEADER_LINE.decode()}); it is left as it is: point annotate.cache at a cache "
                                 f"or a new file")
            raise ValueError(f"{path}:{n}: not a judgment cache row (JSON with {', '.join(ROW)}); fix or remove "
                             f"that line")
        rows.append(row)
    return rows


def cut_torn_line(path: Path, data: bytes) -> None:
    """Call under the lock, with the file's bytes: a last line without its newline there is an
    append cut short by a crash (every writer holds the lock while it writes). It is cut from
    the file, so the next append starts a clean line."""
    complete, _, torn = data.rpartition(b"\n")
    if torn:
        os.truncate(path, len(complete) + 1 if complete else 0)
        print(f"oaif: judgment cache {path}: dropped a torn last line (a write cut short); "
              f"that judgment is asked again", file=sys.stderr)


def read_cache(path: Path) -> list[dict]:
    """The cache's rows (a torn last line dropped: cut_torn_line). A file that is not a cache
    is refused untouched."""
    if not path.exists():
        return []
    if not path.is_file():
        raise ValueError(f"annotate.cache: {path} is not a file; point annotate.cache at a cache or a new file")
    with locked(path):
        data = path.read_bytes()
        complete, _, torn = data.rpartition(b"\n")
        if not complete and torn and not HEADER_LINE.startswith(torn):   # one line, cut short, not the header
            cache_rows(path, torn)   # refused: not a cache
        rows = cache_rows(path, complete)   # checked before anything is cut
        cut_torn_line(path, data)
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """Each row as one whole line, under the lock; a new (empty) cache gets the header first."""
    with locked(path, create=True):
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - 1, 0))
            torn = size > 0 and f.read(1) != b"\n"
        if torn:   # a writer died mid-line since this run read the cache
            cut_torn_line(path, path.read_bytes())
        if path.stat().st_size == 0:
            append_jsonl(path, HEADER)
        for row in rows:
            append_jsonl(path, row)


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
        close_annotator(self.inner)

    def keys(self, requests: list[JudgeRequest]) -> list[str]:
        """Each request's key: the judge (backend, model, constitution and template hashes),
        the judging settings, and the request itself."""
        settings = json.dumps({"identity": dataclasses.asdict(self.identity), **self.settings}, sort_keys=True)
        return [hashlib.sha256(json.dumps([settings, r.messages, r.first, r.second, r.principles]).encode()).hexdigest()
                for r in requests]

    def judge(self, requests: list[JudgeRequest]) -> list[Answer]:
        keys = self.keys(requests)
        todo = [i for i, k in enumerate(keys) if k not in self.entries]
        self.hits += len(requests) - len(todo)
        self.misses += len(todo)
        fresh = self.inner.judge([requests[i] for i in todo]) if todo else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = []
        for i, answer in zip(todo, fresh):
            if answer.p_first is not None and keys[i] not in self.entries:   # a request twice in one batch: one line
                self.entries[keys[i]] = answer
                new.append({"key": keys[i], "p_first": answer.p_first, "raw": answer.raw,
                            "label_mass": answer.label_mass})
        if new:
            append_rows(self.path, new)
        answers = dict(zip(todo, fresh))
        return [answers[i] if i in answers else self.entries[k] for i, k in enumerate(keys)]


def uncached(annotator: Annotator) -> Annotator:
    """The same judge without its judgment cache (a mix's members' too), for a check that must
    reach the judge as it is now (annotate.canary): a cached answer would hide a change."""
    if isinstance(annotator, CachedAnnotator):
        return annotator.inner
    if isinstance(annotator, MixAnnotator):
        return MixAnnotator([(uncached(member), weight) for member, weight in annotator.members])
    return annotator
