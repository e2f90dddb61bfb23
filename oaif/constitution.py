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
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

RULE_FIELDS = {
    "shorter": set(), "longer": set(), "contains": {"text"}, "not_contains": {"text"},
    "regex": {"pattern"}, "max_chars": {"limit"}, "matches_reference": set(),
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

    def score(self, response: str, other: str, references: tuple[str, ...] = ()) -> float:
        """This rule's contribution to `response`'s score when compared with `other`."""
        hit = {
            "matches_reference": lambda: matches_reference(response, references),
            "shorter": lambda: len(response) < len(other),
            "longer": lambda: len(response) > len(other),
            "contains": lambda: self.text in response,
            "not_contains": lambda: self.text not in response,
            "regex": lambda: re.search(self.pattern, response) is not None,
            "max_chars": lambda: len(response) <= self.limit,
        }[self.check]()
        return self.weight if hit else 0.0


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
    unknown = set(raw) - needed - {"check", "weight"}
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
    if "pattern" in needed:
        try:
            re.compile(raw["pattern"])
        except (re.error, TypeError) as e:
            raise ConstitutionError(f"{where}.pattern: not a valid regular expression ({e})") from None
    if "limit" in needed and (isinstance(raw["limit"], bool) or not isinstance(raw["limit"], int) or raw["limit"] < 0):
        raise ConstitutionError(f"{where}.limit: must be a non-negative integer")
    return Rule(check=check, weight=float(weight), text=raw.get("text", ""),
                pattern=raw.get("pattern", ""), limit=raw.get("limit", 0))


def load_constitution(path: str | Path, sample_principles: bool = False) -> Constitution:
    path = Path(path)
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
