"""Judge every pair in both orders and keep only the pairs on which the orders agree.

Position bias is large in LLM judges (RLAIF: the smallest labeler preferred the same
position in 56% of swapped pairs), so each pair (a, b) is asked as (a, b) and as (b, a).
The pair is kept when both orders prefer the same response; its soft label is the mean
probability, over the two orders, that the kept "chosen" response is better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from oaif.annotate.base import Annotator, JudgeRequest, has_markers, leaf_annotators, principles_for
from oaif.records import Judgment, OrderResult, PreferencePair, Sample, Verdict


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
    lean = [(p > 0.5) - (p < 0.5) for p in (p_a_1, p_a_2)]
    if lean[0] != lean[1]:
        return "disagree", p_a
    return {1: "a", -1: "b", 0: "tie"}[lean[0]], p_a


def penalize_missing_eos(p_a_first: float | None, p_b_first: float | None, a: Sample, b: Sample,
                         penalty: float) -> tuple[float | None, float | None]:
    """Move both orders' answers against a response cut off by the length limit (no EOS).

    The penalty is subtracted from that response's logit (TRL's missing_eos_penalty, on a
    pairwise judge): a large one (e.g. 20) makes a truncated response lose to a finished one
    whatever the judge said; equal fates (both or neither truncated) change nothing."""
    shift = penalty * ((a.finish_reason == "length") - (b.finish_reason == "length"))  # > 0: a is penalised
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


def judge_pairs(annotator: Annotator, pairs: list[tuple[Sample, Sample]], round: int, policy_version: int,
                missing_eos_penalty: float = 0.0) -> Judged:
    """All pairs' both-order requests go to the backend in one call (one batch for vLLM)."""
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
    by_pair = {i: (answers[2 * k], answers[2 * k + 1]) for k, i in enumerate(todo)}
    asked = {i: requests[2 * k] for k, i in enumerate(todo)}   # the a-first request of each judged pair

    who = annotator.identity
    sampling = [j.constitution for j in leaf_annotators(annotator)
                if getattr(getattr(j, "constitution", None), "sample_principles", False)]
    judgments, kept = [], []
    for i, (a, b) in enumerate(pairs):
        if i in by_pair:
            first, second = by_pair[i]
            orders = [OrderResult("a", first.p_first, first.raw, first.label_mass),
                      OrderResult("b", second.p_first, second.raw, second.label_mass)]
            verdict, p_a = aggregate(*penalize_missing_eos(first.p_first, second.p_first, a, b, missing_eos_penalty))
        else:
            orders, verdict, p_a = [], "identical", None
        judgments.append(Judgment(
            round=round, policy_version=policy_version, prompt_id=a.prompt_id, a=a.index, b=b.index,
            backend=who.backend, model=who.model, constitution=who.constitution,
            constitution_hash=who.constitution_hash, template_hash=who.template_hash,
            orders=orders, p_a=p_a, verdict=verdict,
            principles=[principles_for(c, asked[i])[0] for c in sampling] if i in asked else []))
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


def judgment_metrics(judgments: list[Judgment]) -> dict[str, float | None]:
    """annotate/* metrics of one round."""
    judged = [j for j in judgments if j.verdict != "identical"]
    valid = [j for j in judged if j.verdict != "invalid"]
    agreed = [j for j in valid if j.verdict in ("a", "b", "tie")]
    kept = [j for j in valid if j.verdict in ("a", "b")]
    answers = [o.p_first for j in valid for o in j.orders]
    masses = [o.label_mass for j in judged for o in j.orders if o.label_mass is not None]
    ratio = lambda n, d: n / d if d else None  # noqa: E731 (None, not 0, when nothing was judged)
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
    }
