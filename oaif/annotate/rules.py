"""The `rules` backend: deterministic, verifiable preferences declared in the constitution.

Each response gets the summed weight of the rule checks it passes (see constitution.py);
the higher score wins with probability 1, equal scores are a tie (0.5).
"""

from __future__ import annotations

from oaif.annotate.base import Answer, Identity, JudgeRequest
from oaif.constitution import Constitution


class RulesAnnotator:
    def __init__(self, constitution: Constitution):
        if not constitution.rules:
            raise ValueError(f"{constitution.path}: the rules backend needs a 'rules:' list in the constitution")
        self.rules = constitution.rules
        self.identity = Identity("rules", "rules", constitution.name, constitution.hash, "")
        self.stats: dict[str, float] = {"requests": 0}

    def score(self, response: str, other: str) -> float:
        return sum(rule.score(response, other) for rule in self.rules)

    def judge(self, requests: list[JudgeRequest]) -> list[Answer]:
        answers = []
        for r in requests:
            s1, s2 = self.score(r.first, r.second), self.score(r.second, r.first)
            p = 1.0 if s1 > s2 else 0.0 if s1 < s2 else 0.5
            answers.append(Answer(p_first=p, raw=f"score_1={s1:g} score_2={s2:g}"))
        self.stats["requests"] += len(requests)
        return answers
