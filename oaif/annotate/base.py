"""What every annotator backend implements, and the judge prompt the LLM backends share.

A backend sees ordered requests (conversation, first response, second response, the
principles to apply) and returns, per request, the probability that the first response is
better, or None with the raw output kept when its answer cannot be read. Judging both
orders, agreement and aggregation live once, in judge.py; a backend never picks a winner
by default.

The judge template is plain text with placeholders; its last line is the answer prefix
(e.g. `Preferred Response=`), after which the judge's label token is read. Text that the
policy or the user controls (the conversation, the responses, few-shot examples) is
inserted with the template's own markers neutralised, so a response that contains
`</response_1>` or `Preferred Response=1` cannot change the prompt's structure.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
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
    # Principles to show the judge; None: the constitution's own choice (all, or one sampled
    # per pair when the constitution was loaded with sample_principles).
    principles: tuple[str, ...] | None = None
    references: tuple[str, ...] = ()   # accepted answers to the prompt, when known (rules backend)


@dataclass(frozen=True)
class Answer:
    p_first: float | None   # P(first response is better); None = invalid answer
    raw: str
    # LLM judges: the share of next-token probability on the two labels. Low means the judge
    # is not answering the question asked, whatever p_first says. None: not measured.
    label_mass: float | None = None


@dataclass(frozen=True)
class Identity:
    """What produced a judgment: recorded with it and part of the judgment cache key."""
    backend: str
    model: str
    constitution: str
    constitution_hash: str
    template_hash: str


class Annotator(Protocol):
    identity: Identity
    stats: dict[str, float]       # running totals (requests, tokens, retries, ...) for metrics

    def judge(self, requests: list[JudgeRequest]) -> list[Answer]:
        """One Answer per request, in order."""
        ...

    # Optional: def use_constitution(self, constitution, template) -> None, to judge with an
    # edited constitution from the next request on (annotate.reload_constitution); `identity`
    # must then follow it. Backends without it keep the constitution they were built with.


REQUIRED = ("{preamble}", "{principles}", "{prompt}", "{response_1}", "{response_2}")
TAG = re.compile(r"</?[A-Za-z_][\w-]*>")
COT_INSTRUCTION = "First explain briefly which response better follows the principles, and why.\nRationale:"


@dataclass(frozen=True)
class JudgeTemplate:
    body: str                 # everything before the answer prefix
    answer_prefix: str        # the template's last line
    markers: tuple[str, ...]  # the template's tags and answer prefix, neutralised in inserted text
    hash: str
    path: str


def load_template(path: str | Path, constitution: Constitution | None = None) -> JudgeTemplate:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"judge template {path} not found (annotate.template)")
    text = path.read_text().rstrip("\n")
    missing = [p for p in REQUIRED if p not in text]
    if missing:
        raise ValueError(f"{path}: the template lacks placeholder(s) {', '.join(missing)}")
    if constitution is not None and constitution.examples and "{examples}" not in text:
        raise ValueError(f"{path}: constitution {constitution.path} has examples but the template has no "
                         f"{{examples}} placeholder")
    body, _, prefix = text.rpartition("\n")
    if not body or not prefix.strip() or "{" in prefix:
        raise ValueError(f"{path}: the last line must be the answer prefix (e.g. 'Preferred Response='), "
                         f"with no placeholder")
    markers = tuple(dict.fromkeys(TAG.findall(body))) + (prefix.strip(),)
    return JudgeTemplate(body=body, answer_prefix=prefix, markers=markers,
                         hash=hashlib.sha256(text.encode()).hexdigest()[:16], path=str(path))


def neutralise(text: str, markers: tuple[str, ...]) -> str:
    """Make the template's own markers inert inside inserted text, visibly:
    `<tag>` -> `&lt;tag>`, `Preferred Response=` -> `Preferred Response =`."""
    for m in markers:
        if m in text:
            text = text.replace(m, "&lt;" + m[1:] if m.startswith("<") else m[:-1] + " " + m[-1])
    return text


def render_conversation(messages: list[Message]) -> str:
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def render_examples(template: JudgeTemplate, constitution: Constitution, labels: tuple[str, str]) -> str:
    safe = lambda t: neutralise(t, template.markers)  # noqa: E731
    blocks = []
    for i, ex in enumerate(constitution.examples, 1):
        rationale = f"Rationale: {safe(ex.rationale)}\n" if ex.rationale else ""
        blocks.append(f"Example {i}:\nConversation:\n{safe(ex.prompt)}\nResponse 1:\n{safe(ex.response_1)}\n"
                      f"Response 2:\n{safe(ex.response_2)}\n{rationale}"
                      f"{template.answer_prefix}{labels[ex.preferred - 1]}")
    return "\n\n".join(blocks)


def judges(annotator: Annotator):
    """The annotators that judge: a mix's members and a cache's inner judge, unwrapped."""
    if hasattr(annotator, "members"):
        for member, _ in annotator.members:
            yield from judges(member)
    elif hasattr(annotator, "inner"):
        yield from judges(annotator.inner)
    else:
        yield annotator


def principles_for(constitution: Constitution, request: JudgeRequest) -> tuple[str, ...]:
    """All principles, or one sampled per comparison (Constitutional AI). The draw is a hash of
    the conversation and the *unordered* pair, so both orders of a pair see the same
    principle, and a repeated run draws the same one (which keeps the judgment cache valid)."""
    if request.principles is not None:
        return request.principles
    if not constitution.sample_principles:
        return constitution.principles
    pair = sorted([request.first, request.second])
    key = json.dumps([request.messages, pair]).encode()
    return (constitution.principles[int(hashlib.sha256(key).hexdigest(), 16) % len(constitution.principles)],)


def render_body(template: JudgeTemplate, constitution: Constitution, request: JudgeRequest,
                labels: tuple[str, str]) -> str:
    """The judge prompt without its answer prefix."""
    safe = lambda t: neutralise(t, template.markers)  # noqa: E731
    # str.format substitutes values verbatim, so braces inside a response are safe.
    return template.body.format(
        preamble=constitution.preamble,
        principles="\n".join(f"{i}. {p}" for i, p in enumerate(principles_for(constitution, request), 1)),
        examples=render_examples(template, constitution, labels),
        prompt=safe(render_conversation(request.messages)),
        response_1=safe(request.first), response_2=safe(request.second),
    )


def render_judge_prompt(template: JudgeTemplate, constitution: Constitution, request: JudgeRequest,
                        labels: tuple[str, str], rationale: str | None = None) -> str:
    """The full prompt, ending with the answer prefix; with a rationale (chain of thought),
    the rationale stands between the body and the answer prefix."""
    body = render_body(template, constitution, request, labels)
    if rationale is not None:
        body = f"{body}\n{COT_INSTRUCTION} {neutralise(rationale.strip(), template.markers)}"
    return f"{body}\n{template.answer_prefix}"


def rationale_prompt(template: JudgeTemplate, constitution: Constitution, request: JudgeRequest,
                     labels: tuple[str, str]) -> str:
    """Chain of thought, step 1: ask for the rationale (RLAIF §2.1.2)."""
    return f"{render_body(template, constitution, request, labels)}\n{COT_INSTRUCTION}"


def text_answer_instruction(template: JudgeTemplate, labels: tuple[str, str]) -> str:
    prefix = template.answer_prefix.strip()
    return (f"Explain briefly, then end with a final line that is exactly `{prefix}{labels[0]}` or "
            f"`{prefix}{labels[1]}` and nothing else.")


def parse_text_answer(text: str, template: JudgeTemplate, labels: tuple[str, str]) -> float | None:
    """Text mode: the label is read only from the answer's last non-empty line, which must be
    exactly `<answer prefix><label>` (surrounding spaces, backticks and asterisks ignored).
    Returns P(first better) as 1.0 / 0.0, or None when the line is missing or malformed."""
    lines = [line.strip().strip("`*").strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    prefix = template.answer_prefix.strip()
    last = lines[-1].replace(" ", "")
    for p, label in zip((1.0, 0.0), labels):
        if last == (prefix + label).replace(" ", ""):
            return p
    return None


def two_label_probability(logp_first: float, logp_second: float) -> float:
    """P(label 1) renormalised over the two labels: softmax of their log-probs, computed
    from the larger one so that a very unlikely label (vLLM reports -9999) cannot overflow."""
    top = max(logp_first, logp_second)
    a, b = math.exp(logp_first - top), math.exp(logp_second - top)
    return a / (a + b)
