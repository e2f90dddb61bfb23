"""Constitutions: the editable files that say what "better" means.

A constitution is a YAML file:

    name: concise                 # recorded with every judgment
    preamble: |                   # the judge's task, in plain words
      ...
    principles:                   # what the judge weighs (LLM backends)
      - Prefer the response that ...
    examples:                     # optional few-shot examples for LLM judges
      - {prompt: ..., response_1: ..., response_2: ..., preferred: 1, rationale: ...}
    rules:                        # optional deterministic checks (the `rules` backend)
      - {check: shorter, weight: 1.0}
      - {check: not_contains, text: "As an AI", weight: 2.0}

Rule checks (each adds its weight to a response's score; the higher score wins):
  shorter / longer          the response with fewer / more characters
  contains / not_contains   `text` appears / does not appear (case-sensitive)
  regex                     `pattern` matches somewhere (Python `re.search`)
  max_chars                 the response has at most `limit` characters
  matches_reference         the response contains one of the prompt's accepted answers (its
                            "references" in the prompt file) as whole words, ignoring case and
                            punctuation; a prompt without references cannot be judged by it
  random                    a coin flip per pair, the same in both orders: the response whose
                            SHA-256 of (`seed`, its text) is larger (optional `seed`, default 0;
                            identical responses tie). It prefers nothing about the answers, so
                            after another rule it decides that rule's ties without steering

Checks that read their constraint from the conversation's system prompt (its leading
"system" message): `pattern` (optional; one group, the constraint; defaults in
SYSTEM_PATTERNS) is searched in it, and the response passes if it keeps what the group says.
A conversation whose system prompt states no such constraint (no system message, or the
pattern does not match) gets nothing from the rule for either response: a tie on that rule.
  system_word_limit         "Answer in at most 12 words": the response has at most 12 words
                            (split on whitespace); a group that is not a whole number: no limit
  system_marker             "Include the word children": the response contains it, ignoring
                            case, not inside a longer word ("children" is not in "childrens");
                            the default pattern reads one word or tag, optionally quoted
  system_prefix             "Start your answer with [FR]": the response starts with it (case ignored)
  system_format             "Answer as a bulleted list" / "numbered list" / "JSON": every non-empty
                            line is a "- ", "* " or "• " item / a "1." or "1)" item, or the whole
                            response (``` fences stripped) is a JSON object or array; the group names the
                            format by one of those words, any other group: no constraint
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from oaif.bundled import data_path

RULE_FIELDS = {
    "shorter": set(), "longer": set(), "contains": {"text"}, "not_contains": {"text"},
    "regex": {"pattern"}, "max_chars": {"limit"}, "matches_reference": set(), "random": set(),
    "system_word_limit": set(), "system_marker": set(), "system_prefix": set(), "system_format": set(),
}
# The system-prompt checks' default patterns (a rule's `pattern` replaces them): the group is the constraint.
SYSTEM_PATTERNS = {
    "system_word_limit": r"(?i)\b(?:at most|no more than|up to) (\d+) words\b",
    "system_marker": r"(?i)\binclude the (?:word|keyword|marker) [\"'“]?([^\s\"'”]+?)[\"'”]?(?=[\s.,;:!?]|$)",
    "system_prefix": r"(?i)\b(?:start|begin) (?:your|each|the) (?:answer|response|reply) with [\"'“]?([^\s\"'”]+?)[\"'”]?(?=[\s.,;:!?]|$)",
    "system_format": r"(?i)\b(bullet(?:ed)? (?:list|points)|numbered list|JSON)\b",
}
TOP_FIELDS = {"name", "description", "preamble", "principles", "examples", "rules"}
EXAMPLE_FIELDS = {"prompt", "response_1", "response_2", "preferred", "rationale"}


class ConstitutionError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    check: str
    weight: float = 1.0
    text: str = ""
    pattern: str = ""
    limit: int = 0
    seed: int = 0

    def score(self, response: str, other: str, references: tuple[str, ...] = (),
              messages: list[dict] = ()) -> float:
        """This rule's contribution to `response`'s score when compared with `other` in the
        conversation `messages`."""
        if self.check in SYSTEM_PATTERNS:
            return self.weight if self.follows_system_prompt(response, messages) else 0.0
        hit = {
            "matches_reference": lambda: matches_reference(response, references),
            "shorter": lambda: len(response) < len(other),
            "longer": lambda: len(response) > len(other),
            "contains": lambda: self.text in response,
            "not_contains": lambda: self.text not in response,
            "regex": lambda: re.search(self.pattern, response) is not None,
            "max_chars": lambda: len(response) <= self.limit,
            "random": lambda: coin(self.seed, response) > coin(self.seed, other),
        }[self.check]()
        return self.weight if hit else 0.0

    def follows_system_prompt(self, response: str, messages: list[dict]) -> bool | None:
        """A system-prompt check: whether the response keeps the constraint the conversation's
        system prompt states; None when it states none this rule reads."""
        found = re.search(self.pattern, system_prompt(messages))
        if found is None:
            return None
        constraint = found.group(1)
        if self.check == "system_word_limit":
            return len(response.split()) <= int(constraint) if constraint.isdigit() else None
        if self.check == "system_marker":
            return re.search(rf"(?<!\w){re.escape(constraint)}(?!\w)", response, re.IGNORECASE) is not None
        if self.check == "system_prefix":
            return re.match(rf"\s*{re.escape(constraint)}(?!\w)", response, re.IGNORECASE) is not None
        return is_format(response, constraint)


def coin(seed: int, text: str) -> bytes:
    """The `random` check's draw for one response: a hash, so the pair gets the same verdict
    whichever response is shown first (a verdict that flips with the order is dropped)."""
    return hashlib.sha256(f"{seed}\0{text}".encode()).digest()


def system_prompt(messages: list[dict]) -> str:
    """The conversation's leading system message ('' when it has none)."""
    return messages[0]["content"] if messages and messages[0]["role"] == "system" else ""


def is_format(response: str, named: str) -> bool | None:
    """Whether the response is in the format `named` (text naming 'bullet', 'numbered' or
    'json'); None for a name that is none of them."""
    named, text = named.lower(), response.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "bullet" in named:
        return bool(lines) and all(re.match(r"[-*•] \S", line) for line in lines)
    if "numbered" in named:
        return bool(lines) and all(re.match(r"\d+[.)] \S", line) for line in lines)
    if "json" in named:
        # A model may wrap JSON in a fenced block (```json ... ```): the fence is not the answer's format.
        text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text, flags=re.IGNORECASE)
        try:
            return isinstance(json.loads(text), (dict, list))   # a bare 12 or "yes" is no JSON answer
        except ValueError:
            return False
    return None


def _words(text: str) -> str:
    """Lower case, every run of non-alphanumerics one space, padded: ' the capital is paris '."""
    return " " + " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split()) + " "


def matches_reference(response: str, references: tuple[str, ...]) -> bool:
    """Whether any accepted answer occurs in the response as whole words ('12' is not in '120')."""
    text = _words(response)
    return any(_words(r).strip() and _words(r) in text for r in references)


@dataclass(frozen=True)
class Example:
    """A few-shot example shown to LLM judges: which of two responses the principles prefer."""
    prompt: str
    response_1: str
    response_2: str
    preferred: int                 # 1 or 2
    rationale: str = ""


@dataclass(frozen=True)
class Constitution:
    name: str
    preamble: str
    principles: tuple[str, ...]
    examples: tuple[Example, ...]
    rules: tuple[Rule, ...]
    hash: str                      # sha256 of the file's bytes, first 16 hex digits
    path: str
    sample_principles: bool = False  # show one principle per comparison instead of all



def _example(path: Path, i: int, raw: object) -> Example:
    where = f"{path}: examples[{i}]"
    if not isinstance(raw, dict):
        raise ConstitutionError(f"{where}: expected a mapping with {sorted(EXAMPLE_FIELDS)}")
    unknown = set(raw) - EXAMPLE_FIELDS
    if unknown:
        raise ConstitutionError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(EXAMPLE_FIELDS)}")
    for key in ("prompt", "response_1", "response_2"):
        if not isinstance(raw.get(key), str):
            raise ConstitutionError(f"{where}.{key}: must be a string")
    if raw.get("preferred") not in (1, 2):
        raise ConstitutionError(f"{where}.preferred: must be 1 or 2, got {raw.get('preferred')!r}")
    if not isinstance(raw.get("rationale", ""), str):
        raise ConstitutionError(f"{where}.rationale: must be a string")
    return Example(raw["prompt"], raw["response_1"], raw["response_2"], raw["preferred"], raw.get("rationale", ""))


def _rule(path: Path, i: int, raw: object) -> Rule:
    where = f"{path}: rules[{i}]"
    if not isinstance(raw, dict) or "check" not in raw:
        raise ConstitutionError(f"{where}: expected a mapping with a 'check' ({', '.join(RULE_FIELDS)})")
    check = raw["check"]
    if check not in RULE_FIELDS:
        raise ConstitutionError(f"{where}.check: unknown check {check!r}; known: {', '.join(RULE_FIELDS)}")
    needed = RULE_FIELDS[check]
    # The system checks have a default pattern; random, a default seed.
    optional = {"pattern"} if check in SYSTEM_PATTERNS else {"seed"} if check == "random" else set()
    unknown = set(raw) - needed - optional - {"check", "weight"}
    if unknown:
        raise ConstitutionError(f"{where}: unknown field(s) {sorted(unknown)} for check {check!r}")
    missing = needed - set(raw)
    if missing:
        raise ConstitutionError(f"{where}: check {check!r} needs {sorted(missing)}")
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
        raise ConstitutionError(f"{where}.weight: must be a positive number, got {weight!r}")
    if "text" in needed and not (isinstance(raw["text"], str) and raw["text"]):
        raise ConstitutionError(f"{where}.text: must be a non-empty string")
    if "pattern" in raw:
        try:
            groups = re.compile(raw["pattern"]).groups
        except (re.error, TypeError) as e:
            raise ConstitutionError(f"{where}.pattern: not a valid regular expression ({e})") from None
        if check in SYSTEM_PATTERNS and groups != 1:
            raise ConstitutionError(f"{where}.pattern: needs exactly one group (the constraint it reads from the "
                                    f"system prompt), has {groups}")
    if "limit" in needed and (isinstance(raw["limit"], bool) or not isinstance(raw["limit"], int) or raw["limit"] < 0):
        raise ConstitutionError(f"{where}.limit: must be a non-negative integer")
    if "seed" in raw and (isinstance(raw["seed"], bool) or not isinstance(raw["seed"], int)):
        raise ConstitutionError(f"{where}.seed: must be an integer")
    return Rule(check=check, weight=float(weight), text=raw.get("text", ""),
                pattern=raw.get("pattern", SYSTEM_PATTERNS.get(check, "")), limit=raw.get("limit", 0),
                seed=raw.get("seed", 0))


def load_constitution(path: str | Path, sample_principles: bool = False) -> Constitution:
    path = data_path(path)
    if not path.is_file():
        raise ConstitutionError(f"constitution file {path} not found (annotate.constitution)")
    data = path.read_bytes()
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise ConstitutionError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConstitutionError(f"{path}: expected a mapping with {sorted(TOP_FIELDS)}")
    unknown = set(raw) - TOP_FIELDS
    if unknown:
        raise ConstitutionError(f"{path}: unknown field(s) {sorted(unknown)}; known: {sorted(TOP_FIELDS)}")
    for key in ("name", "preamble"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise ConstitutionError(f"{path}: '{key}' must be a non-empty string")
    principles = raw.get("principles")
    if not isinstance(principles, list) or not principles:
        raise ConstitutionError(f"{path}: 'principles' must be a non-empty list of strings")
    for i, p in enumerate(principles):
        if not isinstance(p, str) or not p.strip():
            raise ConstitutionError(f"{path}: principles[{i}] must be a non-empty string")
    rules, examples = raw.get("rules") or [], raw.get("examples") or []
    for key, value in (("rules", rules), ("examples", examples)):
        if not isinstance(value, list):
            raise ConstitutionError(f"{path}: '{key}' must be a list")
    return Constitution(
        name=raw["name"].strip(), preamble=raw["preamble"].strip(),
        principles=tuple(p.strip() for p in principles),
        examples=tuple(_example(path, i, e) for i, e in enumerate(examples)),
        rules=tuple(_rule(path, i, r) for i, r in enumerate(rules)),
        hash=hashlib.sha256(data).hexdigest()[:16], path=str(path), sample_principles=sample_principles,
    )
