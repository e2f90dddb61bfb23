"""The records stages hand to each other, and their JSONL files.

Every record carries the round and the policy version (number of weight syncs applied to
the engine) that produced it, so a stage can be re-run alone from saved records.
Files are written whole (temp file + rename) or appended a whole line per write, so a
crash never leaves half a record.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from oaif.config import ConfigError

Message = dict[str, str]  # {"role": ..., "content": ...}


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[Message]
    references: tuple[str, ...] = ()    # accepted answers, for the `matches_reference` rule


@dataclass(frozen=True)
class Sample:
    round: int
    policy_version: int
    prompt_id: str
    messages: list[Message]
    index: int                      # which of the prompt's samples
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]            # response tokens, EOS included when the model stopped
    finish_reason: str              # "stop" (EOS) or "length" (hit max_new_tokens)
    references: list[str] = field(default_factory=list)   # the prompt's accepted answers, if any


Verdict = Literal["a", "b", "tie", "invalid", "disagree", "identical"]


@dataclass(frozen=True)
class OrderResult:
    first: Literal["a", "b"]        # which response the judge saw in position 1
    p_first: float | None           # P(position 1 is better); None when the answer was invalid
    raw: str                        # the backend's raw output, kept for audits
    label_mass: float | None = None  # LLM judges: next-token probability on the two labels


@dataclass(frozen=True)
class Judgment:
    round: int
    policy_version: int
    prompt_id: str
    a: int                          # sample index of response a
    b: int
    backend: str
    model: str
    constitution: str
    constitution_hash: str
    template_hash: str
    orders: list[OrderResult]       # both orders: a first, then b first (empty when identical)
    p_a: float | None               # mean over orders of P(a better)
    verdict: Verdict
    # annotate.principles: sample: the principle each sampling judge showed (both orders saw
    # the same); empty when the judges show every principle.
    principles: list[str] = field(default_factory=list)
    # Response lengths in tokens, a then b, as generate/mean_length counts them: the judge's
    # length preference (judge/longer_chosen_rate, judge/length_slope) is read from them.
    lengths: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class PreferencePair:
    round: int
    policy_version: int
    prompt_id: str
    messages: list[Message]
    chosen: str
    rejected: str
    p_chosen: float                 # soft label: mean P(chosen better) over both orders, >= 0.5
    prompt_token_ids: list[int]
    chosen_token_ids: list[int]
    rejected_token_ids: list[int]


def to_json(record: Any) -> str:
    """One line of strict JSON: a non-finite number (a NaN loss, an infinite ratio) is written
    as null, since `NaN` and `Infinity` are not JSON and most readers other than Python's
    reject the whole line."""
    value = dataclasses.asdict(record) if dataclasses.is_dataclass(record) else record
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), ensure_ascii=False, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_jsonl(path: Path, records: Iterable[Any]) -> None:
    """Write a whole file atomically: readers see the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            for r in records:
                f.write(to_json(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:   # a full disk, or a stop at once: no half-written temp file left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_path(path.parent)   # the rename itself, through a power cut


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename into it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_jsonl(path: Path, record: Any) -> None:
    """Append one record as a single write of one whole line (O_APPEND). A write cut short
    (disk full) is cut back off, so the file never ends in half a record."""
    data = (to_json(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON record ({e.msg}); fix or remove that line") from None
    return out


def is_chat(value) -> bool:
    """A non-empty list of {role, content} messages with string values."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def prompts_from_rows(rows: list, where) -> list[Prompt]:
    """Prompt-file rows as Prompts; where(n) names row n (1-based) in errors."""
    prompts = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{where(n)}: expected an object with 'messages' or 'prompt'")
        if "messages" in row:
            messages = row["messages"]
            if not is_chat(messages):
                raise ValueError(f"{where(n)}: 'messages' must be a non-empty list of {{role, content}} strings")
        elif isinstance(row.get("prompt"), str):
            messages = [{"role": "user", "content": row["prompt"]}]
        else:
            raise ValueError(f"{where(n)}: expected 'messages' (chat list) or 'prompt' (string)")
        references = row.get("references", [])
        if not (isinstance(references, list) and all(isinstance(r, str) and r.strip() for r in references)):
            raise ValueError(f"{where(n)}: 'references' must be a list of non-empty strings (accepted answers)")
        prompts.append(Prompt(id=str(row.get("id", n - 1)), messages=messages, references=tuple(references)))
    return prompts


def as_prompts(items) -> list[Prompt]:
    """A prompt set given in code: Prompt objects, strings, chat message lists, or rows as in
    a prompt file ({"prompt"} or {"messages"}, optional "id" and "references")."""
    if isinstance(items, (str, Path)):
        raise ConfigError("prompts: give a list of prompts (a file goes in the config's `prompts`)")
    items = list(items)
    if items and all(isinstance(p, Prompt) for p in items):
        return items   # already checked (every round's batch comes this way)

    def row(p) -> object:
        if isinstance(p, Prompt):
            return {"id": p.id, "messages": p.messages, "references": list(p.references)}
        return {"prompt": p} if isinstance(p, str) else {"messages": p} if isinstance(p, list) else p

    prompts = prompts_from_rows([row(p) for p in items], lambda n: f"prompts[{n - 1}]")
    if not prompts:
        raise ConfigError("prompts: the list is empty")
    return prompts
