"""More than two responses per prompt: rank them with both-orders comparisons, and choose
the pairs a round trains on.

annotate.ranking, for n = generate.samples_per_prompt responses (comparisons per prompt;
each comparison is 2 judge calls, one per order):
  consecutive   (0, 1), (2, 3), ...: n/2 comparisons, every agreeing one kept (OAIF: n = 2);
                or those annotate.select chooses (annotate/select.py, not here).
  round_robin   every pair: n(n-1)/2. A response's score is the sum, over its comparisons, of
                the both-orders mean P(it is better): a soft Copeland count, which a judge's
                occasional disagreement moves little. Best = highest score, worst = lowest.
  knockout      single elimination for the best (n-1 comparisons), the same among those that
                lost their first match for the worst (about n/2 - 1), and best against worst
                when they have not met (at most 1): about 1.5n comparisons, against
                round_robin's n(n-1)/2 (n = 8: 11 or 12 against 28). A match the orders do not agree on goes to
                the side with the higher mean probability (a tie or an invalid answer: the
                lower-numbered response); the training pair is still only kept when its own
                comparison agreed.
annotate.pairs (round_robin, knockout):
  best_worst    one pair per prompt, best against worst, kept when that comparison agreed
                (Self-Rewarding LMs; online iterative RLHF).
  all           every comparison that agreed (RRHF-style: all ranked pairs).
Every comparison is recorded as a Judgment; all prompts' comparisons of one stage go to the
backend in one call (one knockout stage at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

from oaif.annotate.base import Annotator
from oaif.annotate.length import LengthDebias
from oaif.annotate.judge import Judged, judge_pairs
from oaif.records import Judgment, PreferencePair, Sample


@dataclass(frozen=True)
class Ranking:
    """One prompt's responses (sample indices), best first and worst last; knockout leaves the
    ones in between in sample order. scores: round_robin's, per sample index."""
    round: int
    policy_version: int
    prompt_id: str
    order: list[int]
    scores: list[float] | None
    comparisons: int


Key = tuple[int, int, int]   # (group, sample a, sample b)
Result = tuple[Judgment, PreferencePair | None]   # the comparison, and its pair when the orders agreed


def max_pairs_per_prompt(n: int, ranking: str, pairs: str) -> int:
    """The most pairs one prompt's n responses can give a round (the schedule's horizon)."""
    if ranking == "consecutive":
        return n // 2
    if pairs == "best_worst":
        return 1
    return n * (n - 1) // 2 if ranking == "round_robin" else n - 1 + (n + 1) // 2


def p_better(judgment: Judgment, index: int) -> float:
    """P(sample `index` is better) from a comparison it took part in; 0.5 when the answer
    was invalid or the responses identical."""
    p_a = 0.5 if judgment.p_a is None else judgment.p_a
    return p_a if judgment.a == index else 1.0 - p_a


def winner(judgment: Judgment) -> int:
    if judgment.p_a is None:
        return judgment.a
    return judgment.a if judgment.p_a >= 0.5 else judgment.b


def rank_groups(annotator: Annotator, groups: list[list[Sample]], ranking: str, pairs: str, round: int,
                policy_version: int, missing_eos_penalty: float = 0.0, debias: LengthDebias | None = None,
                min_label_mass: float = 0.0) -> tuple[Judged, list[Ranking]]:
    """Judge each group of samples under `ranking` (round_robin or knockout; consecutive pairs
    are annotate/select.py's); (every comparison and the pairs to train on, per-prompt
    rankings). debias, min_label_mass: as judge_pairs'."""
    results: dict[Key, Result] = {}   # every comparison so far, in the order judged

    def judge(keys: list[Key]) -> None:
        """One call to the backend for these comparisons (both orders each)."""
        judged = judge_pairs(annotator, [(groups[k][a], groups[k][b]) for k, a, b in keys], round, policy_version,
                             missing_eos_penalty, debias, min_label_mass)
        agreeing = iter(judged.pairs)   # one kept pair per agreeing judgment, in order
        for key, j in zip(keys, judged.judgments):
            results[key] = (j, next(agreeing) if j.verdict in ("a", "b") else None)

    if ranking == "round_robin":
        judge([(k, i, j) for k, g in enumerate(groups) for i in range(len(g)) for j in range(i + 1, len(g))])
        scores_of = [[0.0] * len(g) for g in groups]   # one pass over the comparisons, not one per sample
        for (k, a, b), (j, _) in results.items():
            scores_of[k][a] += p_better(j, a)
            scores_of[k][b] += p_better(j, b)
        rankings = []
        for k, (g, scores) in enumerate(zip(groups, scores_of)):
            order = sorted(range(len(g)), key=lambda i: (-scores[i], i))
            rankings.append(Ranking(round, policy_version, g[0].prompt_id, order, scores, len(g) * (len(g) - 1) // 2))
    else:
        rankings = _knockout(groups, results, judge, round, policy_version)
    judgments = [j for j, _ in results.values()]
    if pairs == "all":
        return Judged(judgments, [p for _, p in results.values() if p is not None]), rankings
    chosen = []
    for k, r in enumerate(rankings):
        best, worst = r.order[0], r.order[-1]
        _, pair = results.get((k, min(best, worst), max(best, worst)), (None, None))
        if best != worst and pair is not None:
            chosen.append(pair)
    return Judged(judgments, chosen), rankings


def _knockout(groups: list[list[Sample]], results: dict[Key, Result], judge, round: int,
              policy_version: int) -> list[Ranking]:
    """Stage by stage, every prompt's matches in one call: `up` holds who can still be best,
    `down` who can still be worst (those that lost their first match)."""
    up = [list(range(len(g))) for g in groups]
    down: list[list[int]] = [[] for _ in groups]
    played: list[set[int]] = [set() for _ in groups]

    def matches(field: list[int]) -> list[tuple[int, int]]:
        return [(field[i], field[i + 1]) for i in range(0, len(field) - 1, 2)]

    def advance(k: int, field: list[int], best: bool) -> list[int]:
        out = []
        for a, b in matches(field):
            w = winner(results[(k, a, b)][0])
            out.append(w if best else a + b - w)
        return out + field[len(field) - len(field) % 2:]   # an odd one out goes on unplayed

    while any(len(u) > 1 for u in up) or any(len(d) > 1 for d in down):
        judge([(k, a, b) for k in range(len(groups)) for field in (up[k], down[k]) for a, b in matches(field)])
        for k in range(len(groups)):
            # Who lost its first match can be the worst (the worst loses every match it plays).
            first_losses = [a + b - winner(results[(k, a, b)][0]) for a, b in matches(up[k])]
            first_losses = [i for i in first_losses if i not in played[k]]
            played[k] |= {i for m in matches(up[k]) for i in m}
            down[k] = advance(k, down[k], best=False) + first_losses
            up[k] = advance(k, up[k], best=True)
    # Best against worst where they never met, so the best_worst pair has its own comparison.
    ends = [(k, min(up[k][0], down[k][0]), max(up[k][0], down[k][0])) for k in range(len(groups)) if down[k]]
    judge([key for key in ends if key not in results])
    rankings = []
    for k, g in enumerate(groups):
        order = [up[k][0], *(i for i in range(len(g)) if i not in (up[k][0], *down[k])), *down[k]]
        rankings.append(Ranking(round, policy_version, g[0].prompt_id, order, None,
                                sum(kk == k for kk, _, _ in results)))
    return rankings
