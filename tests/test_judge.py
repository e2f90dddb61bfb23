import pytest

from oaif.annotate.base import Answer, Identity, JudgeRequest
from oaif.annotate.judge import aggregate, judge_pairs, judgment_metrics
from oaif.annotate.rules import RulesAnnotator
from oaif.constitution import load_constitution
from oaif.records import Sample

from conftest import ROOT


def test_agreement_keeps_the_pair_with_the_mean_probability():
    # a first: P(a)=0.8; b first: P(b)=0.3, i.e. P(a)=0.7 -> both prefer a, mean 0.75.
    assert aggregate(0.8, 0.3) == ("a", pytest.approx(0.75))
    assert aggregate(0.1, 0.9) == ("b", pytest.approx(0.1))


def test_disagreement_is_dropped():
    # Pure position bias: the judge prefers whatever is shown first.
    assert aggregate(0.9, 0.9)[0] == "disagree"


def test_invalid_and_tie():
    assert aggregate(None, 0.2) == ("invalid", None)
    assert aggregate(0.7, None) == ("invalid", None)
    assert aggregate(0.5, 0.5) == ("tie", 0.5)
    assert aggregate(0.5, 0.2)[0] == "disagree"  # one order has no preference, the other does


def sample(text: str, index: int, prompt_id: str = "p") -> Sample:
    return Sample(round=0, policy_version=0, prompt_id=prompt_id, messages=[{"role": "user", "content": "q"}],
                  index=index, text=text, prompt_token_ids=[1], token_ids=[2] * (index + 1), finish_reason="stop")


class ScriptedJudge:
    """Stands in for an LLM judge whose answers a test chooses (position bias, invalid output)."""
    identity = Identity("scripted", "none", "c", "h1", "h2")

    def __init__(self, answers):
        self.answers, self.requests, self.stats = list(answers), [], {}

    def judge(self, requests: list[JudgeRequest]) -> list[Answer]:
        self.requests += requests
        return [Answer(p, f"p={p}") for p in self.answers[:len(requests)]]


def test_judge_pairs_asks_both_orders_and_builds_pairs():
    judge = ScriptedJudge([0.2, 0.6, 0.9, 0.9, None, 0.3])
    pairs = [(sample("long answer", 0, "p0"), sample("short", 1, "p0")),
             (sample("x", 0, "p1"), sample("y", 1, "p1")),
             (sample("same", 0, "p2"), sample("same", 1, "p2")),
             (sample("u", 0, "p3"), sample("v", 1, "p3"))]
    out = judge_pairs(judge, pairs, round=3, policy_version=2)
    # Identical responses are never sent; every other pair is sent as (a, b) then (b, a).
    assert [(r.first, r.second) for r in judge.requests] == [
        ("long answer", "short"), ("short", "long answer"), ("x", "y"), ("y", "x"), ("u", "v"), ("v", "u")]
    assert [j.verdict for j in out.judgments] == ["b", "disagree", "identical", "invalid"]
    assert [o.first for o in out.judgments[0].orders] == ["a", "b"]
    [pair] = out.pairs
    assert (pair.chosen, pair.rejected) == ("short", "long answer")
    assert pair.p_chosen == pytest.approx((0.8 + 0.6) / 2)     # P(b) from both orders
    assert pair.chosen_token_ids == [2, 2] and pair.round == 3 and pair.policy_version == 2
    m = judgment_metrics(out.judgments)
    assert m["annotate/order_agreement"] == pytest.approx(1 / 2)   # of 2 valid judged pairs, 1 agreed
    assert m["annotate/invalid_rate"] == pytest.approx(1 / 3)
    assert m["annotate/identical"] == 1
    assert m["annotate/mean_confidence"] == pytest.approx(0.7)


def test_rules_backend_prefers_shorter_in_both_orders():
    judge = RulesAnnotator(load_constitution(ROOT / "constitutions/concise.yaml"))
    out = judge_pairs(judge, [(sample("a long one", 0), sample("short", 1)),
                              (sample("same len", 0), sample("same lon", 1))], 0, 0)
    assert [j.verdict for j in out.judgments] == ["b", "tie"]
    assert out.pairs[0].p_chosen == 1.0
    assert out.judgments[0].orders[0].raw == "score_1=0 score_2=1"
    assert (out.judgments[0].backend, out.judgments[0].constitution) == ("rules", "concise")


def test_missing_eos_penalty_turns_the_verdict_against_a_truncated_response():
    import dataclasses

    finished, truncated = sample("done", 0), dataclasses.replace(sample("cut off", 1), finish_reason="length")
    # The judge prefers the truncated response (b) in both orders: P(a first)=0.3, P(b first)=0.8.
    assert judge_pairs(ScriptedJudge([0.3, 0.8]), [(finished, truncated)], 0, 0).judgments[0].verdict == "b"
    # logit(0.3) = -0.847; +2 for a (b is penalised) gives sigmoid(1.153) = 0.760 (a first);
    # logit(0.8) = 1.386; -2 gives sigmoid(-0.614) = 0.351 (b first), i.e. P(a) = 0.649.
    out = judge_pairs(ScriptedJudge([0.3, 0.8]), [(finished, truncated)], 0, 0, missing_eos_penalty=2.0)
    assert out.judgments[0].verdict == "a"
    assert out.judgments[0].p_a == pytest.approx((0.7601 + 0.6489) / 2, abs=1e-3)
    assert [o.p_first for o in out.judgments[0].orders] == [0.3, 0.8]   # the judge's raw answers are kept
    # Equal fates (both finished) are left alone; a rules judge's exact 0/1 is handled.
    assert judge_pairs(ScriptedJudge([0.3, 0.8]), [(finished, sample("x", 1))], 0, 0,
                       missing_eos_penalty=2.0).judgments[0].p_a == pytest.approx(0.25)
    out = judge_pairs(ScriptedJudge([0.0, 1.0]), [(finished, truncated)], 0, 0, missing_eos_penalty=20.0)
    assert out.judgments[0].verdict == "a"
