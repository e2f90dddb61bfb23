"""What every annotator backend implements, and the judge prompt they share.

A backend sees ordered requests (conversation, first response, second response) and
returns, per request, the probability that the first response is better, or None with the
raw output kept when its answer cannot be read. Judging both orders, checking agreement
and aggregating live once, in judge.py; backends never pick a winner by default.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from oaif.constitution import Constitution
from oaif.records import Message


@dataclass(frozen=True)
class JudgeRequest:
    messages: list[Message]
    first: str
    second: str


@dataclass(frozen=True)
class Answer:
    p_first: float | None   # P(first response is better); None = invalid answer
    raw: str


class Annotator(Protocol):
    backend: str            # recorded with every judgment
    model: str

    def judge(self, requests: list[JudgeRequest]) -> list[Answer]:
        """One Answer per request, in order."""
        ...


PLACEHOLDERS = ("{preamble}", "{principles}", "{prompt}", "{response_1}", "{response_2}")


@dataclass(frozen=True)
class JudgeTemplate:
    text: str
    hash: str
    path: str


def load_template(path: str | Path) -> JudgeTemplate:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"judge template {path} not found (annotate.template)")
    text = path.read_text()
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise ValueError(f"{path}: the template lacks placeholder(s) {', '.join(missing)}")
    return JudgeTemplate(text=text, hash=hashlib.sha256(text.encode()).hexdigest()[:16], path=str(path))


def render_conversation(messages: list[Message]) -> str:
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def render_judge_prompt(template: JudgeTemplate, constitution: Constitution, request: JudgeRequest) -> str:
    # str.format substitutes values verbatim, so braces inside a response are safe.
    return template.text.format(
        preamble=constitution.preamble, principles=constitution.render_principles(),
        prompt=render_conversation(request.messages),
        response_1=request.first, response_2=request.second,
    )
