"""Judge every pair in both orders and keep only the pairs on which the orders agree.

Position bias is large in LLM judges (RLAIF: the smallest labeler preferred the same
position in 56% of swapped pairs), so each pair (a, b) is asked as (a, b) and as (b, a).
The pair is kept when both orders prefer the same response; its soft label is the mean
probability, over the two orders, that the kept "chosen" response is better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from oaif.annotate.base import Annotator, Answer, JudgeRequest, has_markers, leaf_annotators, principles_for
from oaif.annotate.length import LengthDebias, length_point
from oaif.records import Judgment, OrderResult, PreferencePair, Sample, Verdict


def lean(p_a: float) -> int:
    """Which response one order's answer (as P(a better)) prefers: 1 a, -1 b, 0 neither (0.5)."""
    return (p_a > 0.5) - (p_a < 0.5)


def aggregate(p_a_first: float | None, p_b_first: float | None) -> tuple[Verdict, float | None]:
    """Combine the two orders' answers into (verdict, P(a better) averaged over orders).

    p_a_first: P(first better) when a was shown first;  p_b_first: same with b first.
    Invalid if either is None; 'a'/'b' if both orders lean the same way; 'tie' if both are
    exactly 0.5; otherwise 'disagree'.
    """
    if p_a_first is None or p_b_first is None:
        return "invalid", None
    p_a_1, p_a_2 = p_a_first, 1.0 - p_b_first   # both as P(a better)
    p_a = (p_a_1 + p_a_2) / 2
    leans = [lean(p_a_1), lean(p_a_2)]
    if leans[0] != leans[1]:
        return "disagree", p_a
    return {1: "a", -1: "b", 0: "tie"}[leans[0]], p_a


def eos_shift(a: Sample, b: Sample, penalty: float) -> float:
    """annotate.missing_eos_penalty: the logit taken from a response cut off by the length
    limit (no EOS), as a's shift (TRL's missing_eos_penalty, on a pairwise judge): a large
    penalty (e.g. 20) makes a truncated response lose to a finished one whatever the judge
    said; equal fates (both or neither truncated) change nothing."""
    return penalty * ((a.finish_reason == "length") - (b.finish_reason == "length"))


def shift_orders(p_a_first: float | None, p_b_first: float | None, shift: float
                 ) -> tuple[float | None, float | None]:
    """Both orders' answers with `shift` taken off a's logit (given to b's): what the missing-EOS
    penalty and the length debias (oaif/annotate/length.py) remove from a verdict."""
    if not shift or p_a_first is None or p_b_first is None:
        return p_a_first, p_b_first

    def moved(p: float, by: float) -> float:
        p = min(max(p, 1e-6), 1 - 1e-6)  # rules judges answer exactly 0 or 1
        return 1 / (1 + math.exp(-(math.log(p / (1 - p)) + by)))

    return moved(p_a_first, -shift), moved(p_b_first, shift)


@dataclass(frozen=True)
class Judged:
    judgments: list[Judgment]
    pairs: list[PreferencePair]


# The start of an answer's raw text when annotate.min_label_mass made it invalid.
BELOW_LABEL_MASS = "below annotate.min_label_mass"


def floored(answer: Answer, min_label_mass: float) -> Answer:
    """annotate.min_label_mass: an answer with less next-token probability than this on the two
    labels is invalid, its raw text kept after the reason. Answers without a label mass (rules,
    functions, reward models) pass."""
    if answer.p_first is None or answer.label_mass is None or answer.label_mass >= min_label_mass:
        return answer
    return Answer(None, f"{BELOW_LABEL_MASS} {min_label_mass:g} (label mass {answer.label_mass:.4f}): {answer.raw}",
                  answer.label_mass)


def judge_pairs(annotator: Annotator, pairs: list[tuple[Sample, Sample]], round: int, policy_version: int,
                missing_eos_penalty: float = 0.0, debias: LengthDebias | None = None,
                min_label_mass: float = 0.0) -> Judged:
    """All pairs' both-order requests go to the backend in one call (one batch for vLLM).
    debias: annotate.length_debias_window's fit, given these answers, then taken off them.
    min_label_mass: answers below it are invalid (floored)."""
    todo = [i for i, (a, b) in enumerate(pairs) if a.text != b.text]
    requests = []
    for i in todo:
        a, b = pairs[i]
        refs = tuple(a.references)
        requests += [JudgeRequest(a.messages, a.text, b.text, references=refs),
                     JudgeRequest(a.messages, b.text, a.text, references=refs)]
    answers = annotator.judge(requests) if requests else []
    if len(answers) != len(requests):
        raise RuntimeError(f"annotator {annotator.identity.backend} returned {len(answers)} answers for {len(requests)} requests")
    answers = [floored(a, min_label_mass) for a in answers]
    by_pair = {i: (answers[2 * k], answers[2 * k + 1]) for k, i in enumerate(todo)}
    asked = {i: requests[2 * k] for k, i in enumerate(todo)}   # the a-first request of each judged pair
    lengths = [[len(a.token_ids), len(b.token_ids)] for a, b in pairs]
    if debias is not None:
        debias.observe([point for i, (first, second) in by_pair.items()
                        if (point := length_point(first.p_first, second.p_first, lengths[i])) is not None])

    who = annotator.identity
    sampling = [j.constitution for j in leaf_annotators(annotator)
                if getattr(getattr(j, "constitution", None), "sample_principles", False)]
    judgments, kept = [], []
    for i, (a, b) in enumerate(pairs):
        if i in by_pair:
            first, second = by_pair[i]
            orders = [OrderResult("a", first.p_first, first.raw, first.label_mass),
                      OrderResult("b", second.p_first, second.raw, second.label_mass)]
            shift = eos_shift(a, b, missing_eos_penalty) + (debias.shift(lengths[i][0] - lengths[i][1]) if debias else 0)
            verdict, p_a = aggregate(*shift_orders(first.p_first, second.p_first, shift))
        else:
            orders, verdict, p_a = [], "identical", None
        judgments.append(Judgment(
            round=round, policy_version=policy_version, prompt_id=a.prompt_id, a=a.index, b=b.index,
            backend=who.backend, model=who.model, constitution=who.constitution,
            constitution_hash=who.constitution_hash, template_hash=who.template_hash,
            orders=orders, p_a=p_a, verdict=verdict,
            principles=[principles_for(c, asked[i])[0] for c in sampling] if i in asked else [],
            lengths=lengths[i]))
        if verdict in ("a", "b"):
            chosen, rejected = (a, b) if verdict == "a" else (b, a)
            kept.append(PreferencePair(
                round=round, policy_version=policy_version, prompt_id=a.prompt_id, messages=a.messages,
                chosen=chosen.text, rejected=rejected.text,
                p_chosen=p_a if verdict == "a" else 1.0 - p_a,
                prompt_token_ids=a.prompt_token_ids,
                chosen_token_ids=chosen.token_ids, rejected_token_ids=rejected.token_ids))
    return Judged(judgments, kept)


# Below this mean share of next-token probability on the two labels, an LLM judge is mostly
# saying something else than "1" or "2": its preferences are not answers to the question.
LOW_LABEL_MASS = 0.5


def label_mass_warning(metrics: dict) -> str | None:
    """A warning when the judge's label mass is low, else None."""
    mass = metrics.get("annotate/label_mass")
    if mass is None or mass >= LOW_LABEL_MASS:
        return None
    return (f"warning: the judge put only {mass:.0%} of its next-token probability on the two labels: it is "
            f"not answering the question asked, so its preferences carry little signal (order agreement "
            f"{_fmt(metrics.get('annotate/order_agreement'))}, first-position rate "
            f"{_fmt(metrics.get('annotate/first_position_rate'))})")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def injection_attempts(annotator: Annotator, texts: list[str]) -> int:
    """How many of the texts (a round's responses) hold the markers of the annotator's LLM
    judge templates, a label pattern (`preferred response: 1`, in any case or look-alike) or
    chat special tokens: a policy learning to attack its judge shows as a rising count. They
    reach the judge neutralised; this counts the attempts."""
    markers = tuple(dict.fromkeys(m for j in leaf_annotators(annotator) if getattr(j, "template", None)
                                  for m in j.template.markers))
    return sum(has_markers(t, markers) for t in texts)


def ratio(n: float, d: float) -> float | None:
    """n / d; None, not 0, when there was nothing to count (d = 0)."""
    return n / d if d else None


def judgment_metrics(judgments: list[Judgment]) -> dict[str, float | None]:
    """annotate/* metrics of one round."""
    judged = [j for j in judgments if j.verdict != "identical"]
    valid = [j for j in judged if j.verdict != "invalid"]
    agreed = [j for j in valid if j.verdict in ("a", "b", "tie")]
    kept = [j for j in valid if j.verdict in ("a", "b")]
    answers = [o.p_first for j in valid for o in j.orders]
    masses = [o.label_mass for j in judged for o in j.orders if o.label_mass is not None]
    return {
        "annotate/order_agreement": ratio(len(agreed), len(valid)),
        "annotate/invalid_rate": ratio(len(judged) - len(valid), len(judged)),
        "annotate/mean_confidence": ratio(sum(max(j.p_a, 1 - j.p_a) for j in kept), len(kept)),
        "annotate/first_position_rate": ratio(sum(p > 0.5 for p in answers), len(answers)),
        "annotate/label_mass": ratio(sum(masses), len(masses)),
        "annotate/identical": len(judgments) - len(judged),
        "annotate/disagree": sum(j.verdict == "disagree" for j in judgments),
        "annotate/ties": sum(j.verdict == "tie" for j in judgments),
        "annotate/invalid": len(judged) - len(valid),
        "annotate/below_label_mass": sum(any(o.raw.startswith(BELOW_LABEL_MASS) for o in j.orders) for j in judged),
    }


def judge_health(judgments: list[Judgment]) -> dict[str, float | None]:
    """judge/* metrics of one round: how the judge decides, beside whether its orders agree.

    A comparison is valid when both orders were answered; each order then leans to a, to b,
    or to neither (exactly 0.5), read as `aggregate` reads it, from the judge's own answers
    (before annotate.missing_eos_penalty or the length debias moves them).
      tie_rate            valid comparisons with no preference in at least one order.
      flip_rate           of the decisive ones (valid, a preference in both orders), those
                          whose verdict flips with the order: the same position preferred in
                          both (a when a is first, b when b is).
      longer_chosen_rate  comparisons whose orders agreed (kept: what trains the policy)
                          whose chosen response is the longer in tokens; equal lengths left out.
      length_slope        least-squares slope of the judge's both-orders mean P(a better) on
                          len(a) - len(b), per 100 tokens, over the valid comparisons.
    None where a rate has nothing to count."""
    valid = [(j, {o.first: o.p_first for o in j.orders}) for j in judgments
             if len(j.orders) == 2 and all(o.p_first is not None for o in j.orders)]
    p_a = [(j, p["a"], 1.0 - p["b"]) for j, p in valid]     # both orders as P(a better)
    decisive = [(lean(p1), lean(p2)) for _, p1, p2 in p_a if lean(p1) and lean(p2)]
    flips = sum(first != second for first, second in decisive)   # the same position preferred in both
    kept = [j for j in judgments if j.verdict in ("a", "b") and len(j.lengths) == 2 and j.lengths[0] != j.lengths[1]]
    longer = sum((j.lengths[0] > j.lengths[1]) == (j.verdict == "a") for j in kept)
    points = [(d / 100, p_a) for d, p_a in filter(None, (length_point(p["a"], p["b"], j.lengths) for j, p in valid))]
    return {
        "judge/tie_rate": ratio(len(valid) - len(decisive), len(valid)),
        "judge/flip_rate": ratio(flips, len(decisive)),
        "judge/longer_chosen_rate": ratio(longer, len(kept)),
        "judge/length_slope": slope(points),
    }


def slope(points: list[tuple[float, float]]) -> float | None:
    """The least-squares slope of y on x; None without two distinct x."""
    if not points:
        return None
    mean_x, mean_y = sum(x for x, _ in points) / len(points), sum(y for _, y in points) / len(points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else None


def spend_metrics(spent: dict[str, float], kept: int) -> dict[str, float | None]:
    """judge/tokens_per_pair and judge/cost_per_pair from a round's share of the annotator's
    stats: what the API judges (backend openai) were billed, per pair kept. Absent for judges
    that bill nothing; cached answers were never sent, so they cost nothing."""
    per_pair = {"api_tokens": "judge/tokens_per_pair", "api_cost": "judge/cost_per_pair"}
    return {name: ratio(spent[k], kept) for k, name in per_pair.items() if k in spent}
