import dataclasses

import numpy as np
import pytest

from oaif.annotate.base import Answer, Identity, JudgeRequest
from oaif.annotate.judge import aggregate, judge_health, judge_pairs, judgment_metrics, spend_metrics
from oaif.annotate.rules import RulesAnnotator
from oaif.constitution import load_constitution
from oaif.records import Judgment, OrderResult, Sample

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
    assert [j.lengths for j in out.judgments] == [[1, 2]] * 4   # in tokens, a then b (identical ones too)
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


def judged(p_a_first, p_b_first, masses=(None, None), lengths=(1, 1)) -> Judgment:
    """A hand-made judgment from the two orders' answers (verdict and p_a as the judge computes them)."""
    verdict, p_a = aggregate(p_a_first, p_b_first)
    orders = [OrderResult(first, p, f"p={p}", mass) for first, p, mass in zip("ab", (p_a_first, p_b_first), masses)]
    return Judgment(round=0, policy_version=0, prompt_id="p", a=0, b=1, backend="x", model="m", constitution="c",
                    constitution_hash="h", template_hash="t", orders=orders, p_a=p_a, verdict=verdict,
                    lengths=list(lengths))


def test_judgment_metrics_on_hand_made_judgments():
    """first_position_rate (position bias) counts valid answers preferring position 1; each rate has its own base."""
    identical = dataclasses.replace(judged(0.5, 0.5), orders=[], p_a=None, verdict="identical")
    m = judgment_metrics([
        judged(0.9, 0.8, masses=(0.9, 0.7)),    # disagree: position 1 wins in both orders
        judged(0.7, 0.2),                       # a, p_a 0.75
        judged(0.5, 0.5),                       # tie: no position preferred
        judged(None, 0.9, masses=(0.4, None)),  # invalid: its one answer counts for nothing but label mass
        judged(0.6, 0.7),                       # disagree
        identical,                              # never judged
    ])
    assert m == pytest.approx({
        "annotate/first_position_rate": 5 / 8,     # 0.9 0.8 0.7 0.6 0.7 of 8 valid answers (not 0.2 0.5 0.5)
        "annotate/order_agreement": 2 / 4,         # a and tie, of 4 valid
        "annotate/invalid_rate": 1 / 5,            # of 5 judged
        "annotate/mean_confidence": 0.75,          # kept pairs only
        "annotate/label_mass": (0.9 + 0.7 + 0.4) / 3,
        "annotate/identical": 1, "annotate/disagree": 2, "annotate/ties": 1, "annotate/invalid": 1,
        "annotate/below_label_mass": 0,            # the invalid answer was not read, not under a floor
    })


def test_judge_health_on_hand_made_judgments():
    """Each judge/* rate on its own base: tie_rate of the valid comparisons, flip_rate of the
    decisive ones, longer_chosen_rate of the kept pairs of unequal length; the slope over the
    valid ones, from the judge's answers in both orders."""
    rows = [  # (P(first better) with a first, with b first), lengths (a, b)
        ((0.9, 0.8), (10, 30)),   # decisive, flips: position 1 preferred in both orders
        ((0.7, 0.2), (40, 20)),   # decisive, a kept: the longer chosen
        ((0.2, 0.9), (5, 25)),    # decisive, b kept: the longer chosen
        ((0.5, 0.3), (10, 10)),   # no preference with a first: a tie, not decisive
        ((None, 0.9), (1, 2)),    # invalid: counts nowhere
        ((0.3, 0.4), (30, 30)),   # decisive, flips: position 2 preferred in both orders
        ((0.8, 0.1), (10, 50)),   # decisive, a kept: the shorter chosen
        ((0.9, 0.1), (20, 20)),   # decisive, a kept, equal lengths: not in longer_chosen_rate
    ]
    identical = dataclasses.replace(judged(0.5, 0.5), orders=[], p_a=None, verdict="identical")
    m = judge_health([judged(*answers, lengths=lengths) for answers, lengths in rows] + [identical])
    valid = [(answers, lengths) for answers, lengths in rows if None not in answers]
    x = [(la - lb) / 100 for _, (la, lb) in valid]
    y = [(p1 + 1 - p2) / 2 for (p1, p2), _ in valid]   # both orders' mean P(a better)
    assert m == pytest.approx({
        "judge/tie_rate": 1 / 7,             # of 7 valid
        "judge/flip_rate": 2 / 6,            # of 6 decisive
        "judge/longer_chosen_rate": 2 / 3,   # of 3 kept pairs of unequal length
        "judge/length_slope": np.polyfit(x, y, 1)[0],   # per 100 tokens
    })
    # Nothing to count: None, not 0.
    assert judge_health([identical]) == dict.fromkeys(m)
    # A length-blind judge has no slope; one that always prefers the longer, a positive one.
    assert judge_health([judged(0.7, 0.2, lengths=(20, 10)), judged(0.7, 0.2, lengths=(10, 20))]) == \
        pytest.approx({"judge/tie_rate": 0, "judge/flip_rate": 0, "judge/longer_chosen_rate": 0.5,
                       "judge/length_slope": 0})
    longer = judge_health([judged(0.9, 0.1, lengths=(20, 10)), judged(0.1, 0.9, lengths=(10, 20))])
    assert longer["judge/longer_chosen_rate"] == 1 and longer["judge/length_slope"] == pytest.approx(0.8 / 0.2)


def test_spend_per_pair_only_for_judges_that_bill():
    assert spend_metrics({"requests": 8}, 4) == {}   # rules, python, local judges
    assert spend_metrics({"api_tokens": 120, "prompt_tokens": 100}, 4) == {"judge/tokens_per_pair": 30}
    assert spend_metrics({"api_tokens": 120, "api_cost": 0.5}, 4) == {"judge/tokens_per_pair": 30,
                                                                      "judge/cost_per_pair": 0.125}
    assert spend_metrics({"api_tokens": 120, "api_cost": 0.5}, 0) == {"judge/tokens_per_pair": None,
                                                                      "judge/cost_per_pair": None}


def test_generate_metrics_count_truncated_responses_and_skipped_prompts():
    """generate/truncated_rate is the share of responses cut by max_new_tokens (finish_reason 'length')."""
    from oaif.config import GenerateConfig
    from oaif.generate import Generator
    from oaif.records import Prompt

    class Tokenizer:   # one token per character of the last message
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return messages[-1]["content"]

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [1] * len(text)}

    class Engine:      # per prompt: one response cut at max_tokens and one finished, then two finished
        def sample(self, prompt_token_ids, seeds, temperature, top_p, max_tokens):
            finishes = [("length", "stop"), ("stop", "stop")]
            return [[([7] * (max_tokens if f == "length" else 2), "x", f) for f in finishes[j]]
                    for j in range(len(prompt_token_ids))]

    prompts = [Prompt(str(i), [{"role": "user", "content": text}]) for i, text in enumerate(["hi", "hey", "too long"])]
    generator = Generator(Engine(), Tokenizer(), GenerateConfig(max_new_tokens=6), max_prompt_tokens=5)
    groups, m = generator.sample(prompts, 0, 0)
    assert [[s.finish_reason for s in g] for g in groups] == [["length", "stop"], ["stop", "stop"]]
    assert m["generate/truncated_rate"] == 1 / 4 and m["generate/prompts_skipped"] == 1
    assert m["generate/mean_length"] == (6 + 2 + 2 + 2) / 4


def test_a_judgment_records_the_principle_its_judge_was_shown():
    from oaif.annotate.base import JudgeRequest, principles_for
    from oaif.annotate.rules import RulesAnnotator
    from oaif.constitution import load_constitution

    sampled = load_constitution(ROOT / "constitutions/concise.yaml", sample_principles=True)
    pairs = [tuple(Sample(0, 0, f"p{n}", [{"role": "user", "content": f"question {n}"}], k, text, [1], [2], "stop")
                   for k, text in enumerate((f"short {n}", f"a longer answer {n}"))) for n in range(8)]
    judged = judge_pairs(RulesAnnotator(sampled), pairs, 0, 0)
    for j, (a, b) in zip(judged.judgments, pairs):   # what the b-first prompt showed, too
        assert j.principles == list(principles_for(sampled, JudgeRequest(a.messages, b.text, a.text)))
    assert len({tuple(j.principles) for j in judged.judgments}) == 2   # both principles drawn: not vacuous
    every = load_constitution(ROOT / "constitutions/concise.yaml")
    assert all(j.principles == [] for j in judge_pairs(RulesAnnotator(every), pairs, 0, 0).judgments)


def test_the_label_mass_warning_is_given_below_one_half_only():
    from oaif.annotate.judge import label_mass_warning

    assert label_mass_warning({"annotate/label_mass": None}) is None   # rules, functions: no label mass
    assert label_mass_warning({"annotate/label_mass": 0.5}) is None
    said = label_mass_warning({"annotate/label_mass": 0.13, "annotate/order_agreement": 0.2,
                               "annotate/first_position_rate": 0.95})
    assert said.startswith("warning: the judge put only 13% of its next-token probability on the two labels")
    assert "order agreement 0.20, first-position rate 0.95" in said
