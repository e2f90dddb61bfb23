"""What every annotator backend implements, and the judge prompt the LLM backends share.

A backend sees ordered requests (conversation, first response, second response, the
principles to apply) and returns, per request, the probability that the first response is
better, or None with the raw output kept when its answer cannot be read. Judging both
orders, agreement and aggregation live once, in judge.py; a backend never picks a winner
by default.

The judge template is plain text with placeholders; its last line is the answer prefix
(e.g. `Preferred Response=`), after which the judge's label token is read. Text that the
policy or the user controls (the conversation, the responses, few-shot examples, a
rationale) is inserted as data: `neutralise` makes inert, visibly, whatever in it could
pass for the prompt's structure (the template's tags, the answer prefix, chat-format
special tokens, a local judge's own special tokens, a line that starts like a role header),
matched in any case, spacing or Unicode look-alike. So a response cannot close its
delimiter, forge the answer line, end the user turn of a chat template or fake a new turn.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from oaif.bundled import data_path
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


# Bumped whenever the same request renders to another judge prompt (2: inserted text is
# neutralised after folding case, spacing and look-alikes), so cached judgments of the old
# prompts are not taken for the new ones.
PROMPT_FORMAT = 2
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
    # A local judge's tokenizer's special tokens, neutralised in inserted text too (LocalJudge
    # sets them): text that the tokenizer would turn into a special id must stay text.
    specials: tuple[str, ...] = ()


def load_template(path: str | Path, constitution: Constitution | None = None) -> JudgeTemplate:
    path = data_path(path)
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


# Matching sees text the way a reader (or a judge model) might: compatibility forms folded
# (NFKD: fullwidth and mathematical letters), case folded, combining marks, format and
# control characters dropped (zero-width spaces, soft hyphens, bidi controls), every line
# break as "\n", and the common Latin look-alikes of other scripts mapped to Latin.
CONFUSABLES = {
    **dict(zip("АВЕЅІЈКМНОРСТХУҮаеѕіјосрхуүһԁԛԝӏвкмнт", "ABESIJKMHOPCTXYYaesijocpxyyhdqwlbkmht")),  # Cyrillic
    **dict(zip("ΑΒΕΖΗΙΚΜΝΟΡΤΥΧαβεικνορτυχ", "ABEZHIKMNOPTYXabeikvoptux")),  # Greek
    **dict(zip("ıȷɑɡօսꓑꓔ", "ijagouPT")),
    **dict.fromkeys("‹〈⟨ᐸ˂", "<"), **dict.fromkeys("›〉⟩ᐳ˃", ">"),
    **dict.fromkeys("ǀ∣│┃￨⏐", "|"),
    **dict.fromkeys("꞊᐀⹀", "="), **dict.fromkeys("ː∶ꓽ։˸׃", ":"), **dict.fromkeys("∕⁄⧸╱", "/"),
}
INVISIBLE = set("\u115f\u1160\u3164\uffa0")   # Hangul fillers: letters that show nothing
LINE_BREAKS = set("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
# Chat formats' special tokens, whatever the judge's tokenizer: ChatML and Llama 3 (<|...|>),
# Gemma's turns, <s>, </s>, <<SYS>>, [INST] and [/INST].
CHAT_TAGS = ("s", "bos", "eos", "pad", "unk", "sys", "start_of_turn", "end_of_turn")
CHAT_TOKENS = r"<\s*\|[^|<>\n]{1,64}\|\s*>|\[\s*/?\s*inst\s*\]"
# A line that starts like a turn of render_conversation ("User: ...") or of an instruction format.
ROLE_LINE = re.compile(r"(?m)^[^\w\n]*(?P<x>system|user|assistant|human|tool|developer)[^\S\n]*:"
                       r"|^[^\w\n]*#[^\w\n]*(?P<y>instruction|response|input)\b")


@lru_cache(maxsize=4096)
def fold_char(c: str) -> str:
    if c in LINE_BREAKS:
        return "\n"
    if c.isspace():
        return " "
    out = []
    for d in unicodedata.normalize("NFKD", c):
        for f in unicodedata.normalize("NFKD", CONFUSABLES.get(d, d).casefold()):
            if unicodedata.category(f) not in ("Mn", "Me", "Cf", "Cc") and f not in INVISIBLE:
                out.append(CONFUSABLES.get(f, f))
    return "".join(out)


def fold(text: str) -> tuple[str, list[int]]:
    """The text as matched (see CONFUSABLES), and for each of its characters the index of
    the character of `text` it came from."""
    parts = [fold_char(c) for c in text]
    return "".join(parts), [i for i, p in enumerate(parts) for _ in p]


@lru_cache(maxsize=64)
def marker_pattern(markers: tuple[str, ...], specials: tuple[str, ...]) -> re.Pattern:
    """One pattern that finds, at each position where one starts, the template's tags
    (opening or closing, any spacing), the words of its answer prefix (any separator),
    chat-format special tokens and the judge tokenizer's own special tokens."""
    tags = [TAG.fullmatch(m) and m.strip("</>") for m in markers]
    names = [fold(n)[0] for n in [*filter(None, tags), *CHAT_TAGS]]
    alternatives = [rf"<\s*/?\s*(?:{'|'.join(map(re.escape, names))})(?![\w-])", CHAT_TOKENS]
    for m, tag in zip(markers, tags):
        if not tag:   # the answer prefix: its words, whatever separates them
            words = re.findall(r"\w+", fold(m)[0])
            between = r"(?:[^\w\n]|_)*"
            alternatives.append(between.join(map(re.escape, words)) if words else re.escape(fold(m)[0].strip()))
    alternatives += [re.escape(fold(s)[0]) for s in specials if fold(s)[0].strip()]
    return re.compile(f"(?=(?:{'|'.join(alternatives)}))")


def marker_positions(text: str, markers: tuple[str, ...], specials: tuple[str, ...] = (),
                     roles: bool = True) -> set[int]:
    """Indices in `text` of the first character of each marker found (of the keyword, for a
    role line)."""
    folded, source = fold(text)
    starts = {m.start() for m in marker_pattern(markers, specials).finditer(folded)}
    if roles:
        starts |= {m.start("x") if m.group("x") else m.start("y") for m in ROLE_LINE.finditer(folded)}
    return {source[i] for i in starts}


def neutralise(text: str, markers: tuple[str, ...], specials: tuple[str, ...] = ()) -> str:
    """Make inserted text inert inside a judge (or critique) prompt, visibly: the first
    character of each marker found (marker_pattern, and lines that start like a role header)
    becomes an HTML character reference: `</Response_1>` -> `&lt;/Response_1>`,
    `preferred response: 1` -> `&#112;referred response: 1`, `<|im_end|>` -> `&lt;|im_end|>`,
    `User: hi` -> `&#85;ser: hi`. Each marker loses the character it starts with, so none
    is left; `specials` are a local judge tokenizer's special tokens."""
    hits = marker_positions(text, markers, specials)
    if not hits:
        return text
    return "".join(("&lt;" if c == "<" else f"&#{ord(c)};") if i in hits else c for i, c in enumerate(text))


def has_markers(text: str, markers: tuple[str, ...]) -> bool:
    """Whether text holds the judge's markers, a label pattern or chat special tokens (role
    lines, common in ordinary text, do not count): an attempt to steer the judge."""
    return bool(marker_positions(text, markers, roles=False))


def render_conversation(messages: list[Message]) -> str:
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def render_inserted_conversation(messages: list[Message], markers: tuple[str, ...],
                                 specials: tuple[str, ...] = ()) -> str:
    """render_conversation with each message neutralised, so that a message (its role
    included, on one line) cannot close a delimiter or fake a turn."""
    return render_conversation([{"role": neutralise(" ".join(m["role"].split()), markers, specials),
                                 "content": neutralise(m["content"], markers, specials)} for m in messages])


def render_examples(template: JudgeTemplate, constitution: Constitution, labels: tuple[str, str]) -> str:
    safe = lambda t: neutralise(t, template.markers, template.specials)  # noqa: E731
    blocks = []
    for i, ex in enumerate(constitution.examples, 1):
        rationale = f"Rationale: {safe(ex.rationale)}\n" if ex.rationale else ""
        blocks.append(f"Example {i}:\nConversation:\n{safe(ex.prompt)}\nResponse 1:\n{safe(ex.response_1)}\n"
                      f"Response 2:\n{safe(ex.response_2)}\n{rationale}"
                      f"{template.answer_prefix}{labels[ex.preferred - 1]}")
    return "\n\n".join(blocks)


def leaf_annotators(annotator: Annotator):
    """The annotators that judge: a mix's members and a cache's inner judge, unwrapped."""
    if hasattr(annotator, "members"):
        for member, _ in annotator.members:
            yield from leaf_annotators(member)
    elif hasattr(annotator, "inner"):
        yield from leaf_annotators(annotator.inner)
    else:
        yield annotator


def close_annotator(annotator) -> None:
    """Free what a judge holds now (a vLLM judge: its engine; mix and cache: their members'),
    not whenever it is collected. A judge without close() holds nothing that needs it."""
    close = getattr(annotator, "close", None)
    if callable(close):
        close()


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
    safe = lambda t: neutralise(t, template.markers, template.specials)  # noqa: E731
    # str.format substitutes values verbatim, so braces inside a response are safe.
    return template.body.format(
        preamble=constitution.preamble,
        principles="\n".join(f"{i}. {p}" for i, p in enumerate(principles_for(constitution, request), 1)),
        examples=render_examples(template, constitution, labels),
        prompt=render_inserted_conversation(request.messages, template.markers, template.specials),
        response_1=safe(request.first), response_2=safe(request.second),
    )


def render_judge_prompt(template: JudgeTemplate, constitution: Constitution, request: JudgeRequest,
                        labels: tuple[str, str], rationale: str | None = None) -> str:
    """The full prompt, ending with the answer prefix; with a rationale (chain of thought),
    the rationale stands between the body and the answer prefix."""
    body = render_body(template, constitution, request, labels)
    if rationale is not None:
        body = f"{body}\n{COT_INSTRUCTION} {neutralise(rationale.strip(), template.markers, template.specials)}"
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
    `<answer prefix><label>` and nothing else (compared folded, as markers are matched, with
    spaces, backticks and asterisks ignored). A quoted line of a response cannot pass: in the
    prompt it was neutralised (`&#80;referred Response=1`), which is not the answer line.
    Returns P(first better) as 1.0 / 0.0, or None when the line is missing or malformed."""
    squash = lambda t: re.sub(r"[\s`*]", "", fold(t)[0])  # noqa: E731
    lines = [squash(line) for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return None
    for p, label in zip((1.0, 0.0), labels):
        if lines[-1] == squash(template.answer_prefix + label):
            return p
    return None


def two_label_probability(logp_first: float, logp_second: float) -> float:
    """P(label 1) renormalised over the two labels: softmax of their log-probs, computed
    from the larger one so that a very unlikely label (vLLM reports -9999) cannot overflow."""
    top = max(logp_first, logp_second)
    a, b = math.exp(logp_first - top), math.exp(logp_second - top)
    return a / (a + b)
