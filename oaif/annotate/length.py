"""annotate.length_debias_window: take the judge's preference for length out of its labels.

A judge that likes long (or short) answers for their length steers the policy's length on
its own, whatever the constitution asks. After AlpacaEval's length-controlled win rate, the
judge's length effect is fitted over the last N judged pairs (this round's included), as a
logistic regression of its both-orders P(a better) on the length difference,

    logit P(a better) = φ · tanh((len(a) − len(b)) / σ)     σ: a multiple of the differences' spread,

with no intercept (which response is a is arbitrary) and a weak prior on φ (so a judge that
answers only 0 or 1 gets a finite effect). Each order's answer then has φ · tanh(Δ/σ) taken
off its logit before the orders are combined: the soft label of a pair the judge decided on
length alone moves to about 0.5, and its verdict may flip; one decided on content keeps its
side. The soft labels are what the soft-label losses train on (train.loss soft, rloo, dpo
with margin_scale); a hard-label loss (dpo) sees only the verdicts that change. A judge with
no length preference fits φ ≈ 0 and is left as it was.
"""

from __future__ import annotations

import math
from collections import deque

MIN_PAIRS = 16     # fewer judged pairs than this in the window: no fit, nothing removed
PRIOR = 0.1        # L2 weight on φ: keeps the effect of a judge that answers only 0 or 1 finite
SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)   # σ tried, in units of the length differences' spread


def length_point(p_a_first: float | None, p_b_first: float | None, lengths: list[int]) -> tuple[int, float] | None:
    """(len(a) − len(b), the both-orders mean P(a better)) of one comparison, from the judge's
    own answers; None when an order went unanswered or the lengths are unknown."""
    if p_a_first is None or p_b_first is None or len(lengths) != 2:
        return None
    return lengths[0] - lengths[1], (p_a_first + 1.0 - p_b_first) / 2


class LengthDebias:
    def __init__(self, window: int):
        self.points: deque[tuple[int, float]] = deque(maxlen=window)
        self.effect, self.scale = 0.0, 1.0     # φ and σ of the last fit

    def observe(self, points: list[tuple[int, float]]) -> None:
        self.points.extend(points)
        self.effect, self.scale = fit(list(self.points))

    def shift(self, difference: int) -> float:
        """The logit the judge gave a for being len(a) − len(b) = difference tokens longer."""
        return self.effect * math.tanh(difference / self.scale)


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(φ, σ): σ is the one of SCALES × the differences' spread that fits best (judges differ in
    how fast their preference saturates with length), φ by Newton's method on the soft-label
    logistic loss plus PRIOR·φ²/2 (convex in φ: a few steps converge); (0, 1) with too few pairs
    or no length differences."""
    if len(points) < MIN_PAIRS:
        return 0.0, 1.0
    mean = sum(d for d, _ in points) / len(points)
    spread = math.sqrt(sum((d - mean) ** 2 for d, _ in points) / len(points))
    if not spread:
        return 0.0, 1.0
    fits = [fit_effect([(math.tanh(d / (k * spread)), p) for d, p in points]) + (k * spread,) for k in SCALES]
    _, effect, scale = min(fits)
    return effect, scale


def fit_effect(xs: list[tuple[float, float]]) -> tuple[float, float]:
    """(loss, φ) of logit P = φ·x fitted to soft labels (x, P)."""
    effect = 0.0
    for _ in range(50):
        probs = [(x, p, 1 / (1 + math.exp(-effect * x))) for x, p in xs]
        step = (sum(x * (q - p) for x, p, q in probs) + PRIOR * effect) / \
            (sum(x * x * q * (1 - q) for x, _, q in probs) + PRIOR)
        effect -= step
        if abs(step) < 1e-6:
            break
    loss = -sum(p * math.log(max(q, 1e-12)) + (1 - p) * math.log(max(1 - q, 1e-12))
                for x, p in xs for q in [1 / (1 + math.exp(-effect * x))])
    return loss, effect   # the fit's loss without the prior: what picks σ
