"""The `rules` backend: deterministic, verifiable preferences declared in the constitution.

Each response gets the summed weight of the rule checks it passes (see constitution.py;
the system_* checks read their constraint from the request's conversation); the higher
score wins with probability 1, equal scores are a tie (0.5).
"""

from __future__ import annotations

from oaif.annotate.base import Answer, Identity, JudgeRequest
from oaif.constitution import Constitution


class RulesAnnotator:
    def __init__(self, constitution: Constitution):
        self.use_constitution(constitution, None)
        self.stats: dict[str, float] = {"requests": 0}

    def use_constitution(self, constitution: Constitution, template) -> None:
        if not constitution.rules:
            raise ValueError(f"{constitution.path}: the rules backend needs a 'rules:' list in the constitution")
        self.constitution, self.rules = constitution, constitution.rules
        self.needs_references = any(rule.check == "matches_reference" for rule in self.rules)

    @property
    def identity(self) -> Identity:
        return Identity("rules", "rules", self.constitution.name, self.constitution.hash, "")

    def score(self, response: str, other: str, references: tuple[str, ...], messages: list) -> float:
        return sum(rule.score(response, other, references, messages) for rule in self.rules)

    def judge(self, requests: list[JudgeRequest]) -> list[Answer]:
        answers = []
        for r in requests:
            if self.needs_references and not r.references:
                # Without accepted answers a correctness check has nothing to say: counted
                # invalid, never silently a tie.
                answers.append(Answer(None, "matches_reference: this prompt has no references"))
                continue
            s1 = self.score(r.first, r.second, r.references, r.messages)
            s2 = self.score(r.second, r.first, r.references, r.messages)
            p = 1.0 if s1 > s2 else 0.0 if s1 < s2 else 0.5
            answers.append(Answer(p_first=p, raw=f"score_1={s1:g} score_2={s2:g}"))
        self.stats["requests"] += len(requests)
        return answers
