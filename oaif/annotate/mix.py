"""The `mix` backend: a weighted mix of annotators, e.g. an LLM judge for helpfulness plus
rules for format, or a safety constitution plus a helpfulness one (as Llama 2 combined two
reward models). P(first better) is the weighted mean of the members'; a member's invalid
answer makes the mixed answer invalid, since a silent renormalisation would change what
the mix means from one pair to the next.
"""

from __future__ import annotations

import hashlib

from oaif.annotate.base import Annotator, Answer, Identity, JudgeRequest, close_annotator


class MixAnnotator:
    def __init__(self, members: list[tuple[Annotator, float]]):
        self.members = members

    @property
    def identity(self) -> Identity:   # from the members' current ones (a constitution may be reloaded)
        ids = [a.identity for a, _ in self.members]
        signature = "|".join(f"{i.backend}:{i.model}:{i.constitution_hash}:{i.template_hash}:{w}"
                             for i, (_, w) in zip(ids, self.members))
        return Identity(
            backend="mix(" + ",".join(f"{i.backend}*{w:g}" for i, (_, w) in zip(ids, self.members)) + ")",
            model="+".join(i.model for i in ids), constitution="+".join(i.constitution for i in ids),
            constitution_hash=hashlib.sha256(signature.encode()).hexdigest()[:16],
            template_hash="+".join(i.template_hash for i in ids))

    @property
    def stats(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for a, _ in self.members:
            for k, v in a.stats.items():
                total[k] = total.get(k, 0) + v
        return total

    def close(self) -> None:
        for a, _ in self.members:
            close_annotator(a)

    def judge(self, requests: list[JudgeRequest]) -> list[Answer]:
        per_member = [a.judge(requests) for a, _ in self.members]
        total_weight = sum(w for _, w in self.members)
        answers = []
        for k in range(len(requests)):
            parts = [(a.identity, w, answers_[k]) for (a, w), answers_ in zip(self.members, per_member)]
            raw = " | ".join(f"{i.backend}/{i.constitution} w={w:g}: {ans.raw}" for i, w, ans in parts)
            masses = [ans.label_mass for _, _, ans in parts if ans.label_mass is not None]
            mass = sum(masses) / len(masses) if masses else None   # the LLM members' mean
            if any(ans.p_first is None for _, _, ans in parts):
                answers.append(Answer(None, raw, mass))
            else:
                answers.append(Answer(sum(w * ans.p_first for _, w, ans in parts) / total_weight, raw, mass))
        return answers
