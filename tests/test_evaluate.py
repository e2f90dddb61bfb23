"""Tier 1: evaluation arithmetic on hand-made judgments (no model)."""

import math
import random

import pytest

from oaif.annotate.base import Answer, Identity
from oaif.annotate.rules import RulesAnnotator
from oaif.constitution import load_constitution, matches_reference
from oaif.evaluation import Response, bootstrap_interval, compare, lc_win_rate, summarize

from conftest import ROOT


def record(outcome: str, p: float | None, policy_tokens: int = 10, baseline_tokens: int = 10, kl=None) -> dict:
    return {"outcome": outcome, "p_policy": p, "policy_tokens": policy_tokens, "baseline_tokens": baseline_tokens,
            "kl_to_ref": kl}


def test_win_rate_counts_ties_as_half_and_leaves_invalid_out():
    records = ([record("win", 0.9)] * 3 + [record("tie", 0.5)] * 2 + [record("loss", 0.1)]
               + [record("invalid", None)])
    m = summarize(records, resamples=200)
    assert (m["eval/wins"], m["eval/ties"], m["eval/losses"], m["eval/invalid"]) == (3, 2, 1, 1)
    assert m["eval/win_rate_vs_ref"] == pytest.approx((3 + 2 / 2) / 6)
    assert m["eval/win_rate_ci_low"] <= m["eval/win_rate_vs_ref"] <= m["eval/win_rate_ci_high"]
    assert m["eval/kl_to_ref"] is None   # no KL measured: None, never 0


class PositionBiased:
    """A judge that prefers whatever it sees first (what SmolLM2-135M does), for the
    conservative rule: its two orders always disagree."""
    identity = Identity("biased", "biased", "x", "0", "0")
    stats: dict = {}

    def judge(self, requests):
        return [Answer(0.9, "first") for _ in requests]


def responses(texts: list[str], refs=()) -> list[Response]:
    return [Response(f"p{i}", [{"role": "user", "content": "q"}], list(refs), [1, 2], list(range(len(t.split()))),
                     t, "stop") for i, t in enumerate(texts)]


def test_conservative_rule_a_win_needs_both_orders():
    rules = RulesAnnotator(load_constitution(ROOT / "constitutions/concise.yaml"))
    policy = responses(["short", "a much longer answer here", "same", "two words"])
    baseline = responses(["a longer one here", "tiny", "same", "six words"])
    records, _ = compare(rules, policy, baseline, kl=None, round=0, policy_version=1)
    # shorter wins (both orders) / longer loses / identical ties / equal length: the rule ties
    assert [r["outcome"] for r in records] == ["win", "loss", "tie", "tie"]
    assert [r["verdict"] for r in records] == ["a", "b", "identical", "tie"]
    records, metrics = compare(PositionBiased(), policy, baseline, kl=None, round=0, policy_version=1)
    assert [r["verdict"] for r in records] == ["disagree", "disagree", "identical", "disagree"]
    assert summarize(records, 10)["eval/win_rate_vs_ref"] == 0.5
    assert metrics["eval/first_position_rate"] == 1.0 and metrics["eval/order_agreement"] == 0.0


def test_bootstrap_interval_narrows_with_more_comparisons():
    rng = random.Random(1)
    small = [float(rng.random() < 0.7) for _ in range(20)]
    large = [float(rng.random() < 0.7) for _ in range(2000)]
    lo_s, hi_s = bootstrap_interval(small, 1000)
    lo_l, hi_l = bootstrap_interval(large, 1000)
    assert hi_l - lo_l < (hi_s - lo_s) / 4
    assert lo_l < 0.7 < hi_l
    assert bootstrap_interval([1.0] * 5, 100) == (1.0, 1.0)
    assert bootstrap_interval(small, 500, seed=3) == bootstrap_interval(small, 500, seed=3)


def test_lc_win_rate_is_half_when_the_judge_only_rewards_length():
    rng = random.Random(0)
    diffs = [rng.gauss(-8, 10) for _ in range(400)]          # the policy is mostly shorter
    p = [1 / (1 + math.exp(0.4 * d)) for d in diffs]        # the judge only rewards shortness
    raw = sum(p) / len(p)
    assert raw > 0.75
    assert lc_win_rate(p, diffs) == pytest.approx(0.5, abs=0.03)
    # Hard 0/1 labels from a noisy length-only judge: about half, within sampling noise (few
    # comparisons lie near equal length, so this needs many).
    diffs = [rng.gauss(-8, 10) for _ in range(3000)]
    hard = [float(d + rng.gauss(0, 3) < 0) for d in diffs]
    assert sum(hard) / len(hard) > 0.75
    assert lc_win_rate(hard, diffs) == pytest.approx(0.5, abs=0.07)


def test_lc_win_rate_keeps_a_preference_that_is_not_about_length():
    rng = random.Random(0)
    diffs = [rng.gauss(-8, 10) for _ in range(400)]
    p = [1 / (1 + math.exp(-(1.5 - 0.4 * d))) for d in diffs]   # better at any length, plus a length term
    assert lc_win_rate(p, diffs) == pytest.approx(1 / (1 + math.exp(-1.5)), abs=0.03)
    assert lc_win_rate([0.8] * 10, [0.0] * 10) == pytest.approx(0.8, abs=1e-3)   # no length spread
    assert lc_win_rate([], []) is None


def test_matches_reference_is_whole_words_case_and_punctuation_blind():
    assert matches_reference("The capital of France is Paris.", ("paris",))
    assert matches_reference("It's Carbon-Dioxide!", ("carbon dioxide", "CO2"))
    assert matches_reference("twelve", ("12", "twelve"))
    assert not matches_reference("There are 120 of them.", ("12",))
    assert not matches_reference("Parisian food", ("Paris",))
    assert not matches_reference("anything", ())


def test_correctness_rule_needs_references():
    rules = RulesAnnotator(load_constitution(ROOT / "constitutions/correct.yaml"))
    policy, baseline = responses(["It is Paris."], ["Paris"]), responses(["It is Lyon."], ["Paris"])
    records, _ = compare(rules, policy, baseline, kl=None, round=0, policy_version=1)
    assert records[0]["outcome"] == "win"
    records, _ = compare(rules, responses(["It is Paris."]), responses(["It is Lyon."]), kl=None, round=0,
                         policy_version=1)
    assert records[0]["outcome"] == "invalid"   # no references: cannot be judged, never a silent tie
    assert "no references" in records[0]["orders"][0]["raw"]
