"""Which comparisons of a round the judge is asked for (annotate.select, annotate.budget).

With an API judge the judge calls are the bill: two per comparison (both orders), every
round. With generate.samples_per_prompt > 2 a cheap proxy (annotate/proxy.py) scores every
response and a rule sends the judge only the comparisons that teach most; the round reads
samples -> proxy rewards -> chosen comparisons -> judgments -> pairs.

annotate.select.rule (each gives a prompt's candidates, most informative first, a priority
that orders the prompts when the budget cannot pay for all of them):
  random      (0, 1), (2, 3), ...: the samples are drawn independently, so these are random
              pairs (OAIF); no proxy, and with no budget the round is today's, bit for bit.
  max_margin  the proxy's best against its worst (its heads' mean reward): the pair it is
              surest about, which the judge then confirms or corrects (online iterative RLHF's
              best-vs-worst, with the proxy in the reward model's place).
  uncertain   the pair whose reward difference varies most across the heads (oat's
              EnnUncertainty): where the judge's verdict moves the proxy most.
  sea         one head, drawn at random, picks its best response (Thompson sampling); its
              opponent is the response whose comparison with it the heads disagree on most
              (SEA's best-arm-identification variant, oat's EnnBAITS; Liu et al. 2024).
With no judged pair yet every head scores 0 and each rule picks (0, 1): a random pair.

annotate.budget.calls_per_round: comparisons are bought level by level (every prompt's first
candidate, then every prompt's second, ...), within a level in the rule's priority order,
while the round's allowance pays for them; a comparison of two identical responses is never
sent to the judge and costs nothing.
"""

from __future__ import annotations

import random
from typing import Protocol

import torch

from oaif.records import Sample

Key = tuple[int, int, int]   # (group, sample a, sample b), a < b
Candidate = tuple[int, int, float]   # (sample a, sample b, priority): a prompt's comparison


class Rule(Protocol):
    needs_proxy: bool

    def candidates(self, rewards: torch.Tensor, per_prompt: int, rng: random.Random) -> list[Candidate]:
        """One prompt's comparisons, most informative first; rewards: the proxy's, (heads, n)."""
        ...


def consecutive(n: int) -> list[tuple[int, int]]:
    """OAIF's pairing of n samples: (0, 1), (2, 3), ..."""
    return [(i, i + 1) for i in range(0, n - 1, 2)]


def reward_gaps(rewards: torch.Tensor) -> torch.Tensor:
    """(heads, n, n): each head's r_i - r_j."""
    return rewards[:, :, None] - rewards[:, None, :]


def best_pairs(scores: torch.Tensor, pairs: list[tuple[int, int]], per_prompt: int) -> list[Candidate]:
    """The per_prompt pairs with the highest score (an (n, n) matrix); ties go to the lower indices."""
    ranked = sorted(((min(i, j), max(i, j), float(scores[i, j])) for i, j in pairs), key=lambda c: (-c[2], c[0], c[1]))
    return ranked[:per_prompt]


def all_pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


class RandomPairs:
    needs_proxy = False

    def candidates(self, rewards, per_prompt, rng) -> list[Candidate]:
        return [(a, b, 0.0) for a, b in consecutive(rewards.shape[1])]


class MaxMargin:
    needs_proxy = True

    def candidates(self, rewards, per_prompt, rng) -> list[Candidate]:
        return best_pairs(reward_gaps(rewards).mean(0).abs(), all_pairs(rewards.shape[1]), per_prompt)


class Uncertain:
    needs_proxy = True

    def candidates(self, rewards, per_prompt, rng) -> list[Candidate]:
        return best_pairs(reward_gaps(rewards).var(0, unbiased=False), all_pairs(rewards.shape[1]), per_prompt)


class SEA:
    needs_proxy = True

    def candidates(self, rewards, per_prompt, rng) -> list[Candidate]:
        first = int(rewards[rng.randrange(rewards.shape[0])].argmax())   # a posterior sample's best
        others = [(first, j) for j in range(rewards.shape[1]) if j != first]
        return best_pairs(reward_gaps(rewards).var(0, unbiased=False), others, per_prompt)


RULES: dict[str, Rule] = {"random": RandomPairs(), "max_margin": MaxMargin(), "uncertain": Uncertain(), "sea": SEA()}


def choose(groups: list[list[Sample]], rewards: list[torch.Tensor], rule: Rule, per_prompt: int,
           allowance: int | None, rng: random.Random) -> list[Key]:
    """The round's comparisons, in (group, a, b) order: each prompt's candidates under `rule`,
    bought level by level while `allowance` judge calls (None: no cap) pay for them."""
    per_group = [rule.candidates(r, per_prompt, rng) for r in rewards]
    chosen, spent = [], 0
    for level in range(max(map(len, per_group), default=0)):
        offers = [(k, c[level]) for k, c in enumerate(per_group) if level < len(c)]
        for k, (a, b, _) in sorted(offers, key=lambda o: -o[1][2]):   # stable: prompt order among equals
            cost = 0 if groups[k][a].text == groups[k][b].text else 2
            if allowance is None or spent + cost <= allowance:
                chosen.append((k, a, b))
                spent += cost
    return sorted(chosen)
