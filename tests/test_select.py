"""Spending the judge where it teaches: annotate.select's rules and proxy, annotate.budget,
and annotate.min_label_mass."""

import io
import random

import pytest
import torch

from oaif.annotate.base import Answer
from oaif.annotate.judge import judge_pairs, judgment_metrics
from oaif.annotate.select import RULES, choose
from oaif.config import ConfigError, load_config
from oaif.records import read_jsonl

from conftest import ROOT, oaif_main, untimed
from test_judge import ScriptedJudge, sample

# Two heads, four responses. Mean rewards -1, 2, 0.5, 1.1: best 1, worst 0. The heads
# disagree about response 2 (4 against -3); of its comparisons, the one with 3 varies most.
REWARDS = torch.tensor([[-1.0, 2.0, 4.0, 1.0],
                        [-1.0, 2.0, -3.0, 1.2]])


def test_each_rule_picks_what_it_says_on_a_hand_made_proxy():
    def first(rule: str, rng=None) -> tuple[int, int]:
        a, b, _ = RULES[rule].candidates(REWARDS, 1, rng or random.Random(0))[0]
        return a, b

    assert first("max_margin") == (0, 1)
    assert first("uncertain") == (2, 3)
    assert [(a, b) for a, b, _ in RULES["random"].candidates(REWARDS, 1, random.Random(0))] == [(0, 1), (2, 3)]
    # sea: a random head's best, against the response whose comparison with it is least certain.
    # Head 0's best is 2 (its most uncertain opponent: 3); head 1's is 1 (opponent: 2).
    seen = set()
    for seed in range(20):
        head = random.Random(seed).randrange(2)
        assert first("sea", random.Random(seed)) == {0: (2, 3), 1: (1, 2)}[head]
        seen.add(head)
    assert seen == {0, 1}
    # More than one comparison per prompt: the next most uncertain pairs, no repeats.
    pairs = [(a, b) for a, b, _ in RULES["uncertain"].candidates(REWARDS, 3, random.Random(0))]
    assert pairs[0] == (2, 3) and len(set(pairs)) == 3 and all(2 in p for p in pairs)
    # Before the proxy has seen a verdict every head scores 0: every rule picks (0, 1), a random pair.
    zeros = torch.zeros(8, 4)
    assert all(RULES[r].candidates(zeros, 1, random.Random(0))[0][:2] == (0, 1) for r in RULES)


def test_the_budget_buys_every_prompt_s_first_comparison_before_any_second():
    groups = [[sample(t, k, p) for k, t in enumerate(texts)]
              for p, texts in (("p", "abcd"), ("q", "efgh"), ("r", "iijk"))]
    sure = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    # Per prompt: pairs by how much the heads disagree; q's best pair is the most uncertain of all.
    rewards = [sure + torch.tensor([[0.0, 0, 0, 1], [0, 0, 0, -1]]),
               sure + torch.tensor([[0.0, 0, 0, 5], [0, 0, 0, -5]]),
               sure]
    rule = RULES["uncertain"]
    everything = choose(groups, rewards, rule, 2, None, random.Random(0))
    assert len(everything) == 6
    # 4 calls: the two most uncertain prompts' first comparisons; r's heads agree everywhere, and
    # its first pick, (0, 1), is two identical responses: never sent, free.
    assert choose(groups, rewards, rule, 2, 4, random.Random(0)) == [(0, 0, 3), (1, 0, 3), (2, 0, 1)]
    assert choose(groups, rewards, rule, 2, 3, random.Random(0)) == [(1, 0, 3), (2, 0, 1)]
    # Random pairs, capped: prompt order; r's (0, 1) is two identical responses, never sent, free.
    assert choose(groups, [torch.zeros(1, 4)] * 3, RULES["random"], 1, 4, random.Random(0)) == [
        (0, 0, 1), (1, 0, 1), (2, 0, 1)]


class LabelledJudge(ScriptedJudge):
    """An LLM judge's answers: a probability and the share of next-token mass on the labels."""

    def __init__(self, answers: list[tuple[float, float]]):
        super().__init__([p for p, _ in answers])
        self.masses = [m for _, m in answers]

    def judge(self, requests):
        return [Answer(a.p_first, a.raw, m) for a, m in zip(super().judge(requests), self.masses)]


def test_an_answer_below_the_label_mass_floor_is_invalid_and_counted():
    pairs = [(sample("long answer", 0, "p0"), sample("short", 1, "p0")),
             (sample("x", 0, "p1"), sample("yy", 1, "p1"))]
    answers = [(0.2, 0.9), (0.8, 0.9), (0.2, 0.9), (0.8, 0.1)]   # pair 2's second order: 10% on the labels
    kept = judge_pairs(LabelledJudge(answers), pairs, 0, 0)
    assert [j.verdict for j in kept.judgments] == ["b", "b"]   # no floor: both are verdicts
    floored = judge_pairs(LabelledJudge(answers), pairs, 0, 0, min_label_mass=0.3)
    assert [j.verdict for j in floored.judgments] == ["b", "invalid"] and len(floored.pairs) == 1
    order = floored.judgments[1].orders[1]
    assert order.p_first is None and order.label_mass == 0.1 and "below annotate.min_label_mass 0.3" in order.raw
    m = judgment_metrics(floored.judgments)
    assert m["annotate/below_label_mass"] == 1 and m["annotate/invalid_rate"] == 0.5
    assert judgment_metrics(kept.judgments)["annotate/below_label_mass"] == 0


@pytest.mark.parametrize("overrides, says", [
    (["annotate.select.rule=uncertain"], "generate.samples_per_prompt: annotate.select.rule 'uncertain'"),
    (["annotate.select.rule=sea", "generate.samples_per_prompt=4", "annotate.ranking=knockout"],
     "annotate.select.rule: 'sea' chooses the comparisons itself; set annotate.ranking=consecutive"),
    (["annotate.budget.calls_per_round=1"], "annotate.budget.calls_per_round: 1 is less than one comparison"),
    (["annotate.budget.calls_total=20", "generate.samples_per_prompt=4", "annotate.ranking=round_robin"],
     "annotate.budget: a cap on judge calls is spent by annotate.select.rule"),
    (["eval.annotate.select.rule=sea"], "eval.annotate.select / budget"),
    (["annotate.min_label_mass=1.5"], "annotate.min_label_mass: must be in [0, 1)"),
])
def test_select_and_budget_config_errors_name_the_key(overrides, says):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny_cpu.yaml", overrides)
    assert says in str(e.value), str(e.value)


def test_the_evaluation_judge_does_not_inherit_the_training_judge_s_selection():
    cfg = load_config(ROOT / "configs/experiments/online_offline_tiny.yaml", [
        "generate.samples_per_prompt=4", "annotate.select.rule=sea", "annotate.budget.calls_per_round=32"])
    assert cfg.annotate.select.rule == "sea" and cfg.eval.annotate.select.rule == "random"
    assert cfg.eval.annotate.budget.calls_per_round == 0 and cfg.eval.annotate.backend == "rules"


SHORTER = '''import math

def judge(prompt_messages, response_1, response_2):
    return 1 / (1 + math.exp((len(response_1) - len(response_2)) / 10))
'''


def python_judge_run(tiny_model, tmp_path, name: str, *overrides: str):
    (tmp_path / "shorter.py").write_text(SHORTER)
    return oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                     f"name={name}", "annotate.backend=python", f"annotate.python={tmp_path / 'shorter.py'}:judge",
                     "generate.enforce_eager=true", "generate.samples_per_prompt=4", "annotate.canary.every=0",
                     *overrides)


def test_the_proxy_learns_what_the_judge_prefers(tiny_model, tmp_path):
    """A judge that prefers shorter answers: from round 1 on the proxy (fit on the verdicts of
    the rounds before) calls the judge's winner of most new comparisons."""
    r = python_judge_run(tiny_model, tmp_path, "learns", "rounds=4", "annotate.select.rule=uncertain",
                         "annotate.select.comparisons_per_prompt=2")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_jsonl(tmp_path / "learns/metrics.jsonl")
    assert metrics[0]["select/proxy_accuracy"] is None and metrics[0]["select/proxy_pairs"] == 0
    later = [m["select/proxy_accuracy"] for m in metrics[1:]]
    assert sum(later) / len(later) > 0.7, later
    assert all(m["select/proxy_pairs"] > 0 and m["annotate/comparisons"] == 2 * 16 for m in metrics[1:])
    assert all((tmp_path / f"learns/rounds/{k:06d}/proxy.pt").is_file() for k in range(4))


def test_the_budget_caps_each_round_and_ends_the_run_with_a_checkpoint(tiny_model, tmp_path):
    r = python_judge_run(tiny_model, tmp_path, "budget", "rounds=10", "prompts_per_round=8",
                         "annotate.select.rule=max_margin", "annotate.budget.calls_per_round=10",
                         "annotate.budget.calls_total=25")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_jsonl(tmp_path / "budget/metrics.jsonl")
    assert 2 <= len(metrics) < 10
    assert all(m["annotate/judge_calls"] <= 10 for m in metrics)
    totals = [m["budget/judge_calls"] for m in metrics]
    assert totals == [sum(m["annotate/judge_calls"] for m in metrics[:k + 1]) for k in range(len(metrics))]
    assert 24 <= totals[-1] <= 25 and all(t < 24 for t in totals[:-1])
    last = len(metrics) - 1
    assert (tmp_path / f"budget/checkpoints/round_{last:06d}").is_dir()
    said = [line for line in r.stdout.splitlines() if "judge budget spent" in line]
    assert said == [f"judge budget spent after round {last} ({totals[-1]} of 25 judge calls spent, "
                    f"annotate.budget.calls_total); checkpoint written; to go on, raise it: oaif resume "
                    f"{tmp_path / 'budget'} annotate.budget.calls_total=N"]
    # Resumed as it is: nothing left to spend, nothing done; with more budget it goes on.
    r = oaif_main("resume", str(tmp_path / "budget"))
    assert r.returncode == 0 and "judge budget spent" in r.stdout, r.stderr[-3000:]
    assert len(read_jsonl(tmp_path / "budget/metrics.jsonl")) == len(metrics)
    r = oaif_main("resume", str(tmp_path / "budget"), "annotate.budget.calls_total=45")
    assert r.returncode == 0, r.stderr[-3000:]
    more = read_jsonl(tmp_path / "budget/metrics.jsonl")
    assert len(more) > len(metrics) and 44 <= more[-1]["budget/judge_calls"] <= 45


def test_a_resumed_select_run_matches_an_uninterrupted_one(tiny_model, tmp_path):
    """sea draws heads and refits its proxy every round: redone from round 1's checkpoint, rounds
    2 and 3 are the same records, proxies and metrics as the first time."""
    r = python_judge_run(tiny_model, tmp_path, "res", "rounds=4", "train.checkpoint_every=2",
                         "annotate.select.rule=sea", "annotate.budget.calls_per_round=24")
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "res"
    names = ("samples.jsonl", "judgments.jsonl", "pairs.jsonl", "proxy.pt")
    first = {(k, n): (run_dir / f"rounds/{k:06d}/{n}").read_bytes() for k in (2, 3) for n in names}
    original = read_jsonl(run_dir / "metrics.jsonl")
    r = oaif_main("resume", str(run_dir), "--checkpoint", str(run_dir / "checkpoints/round_000001"))
    assert r.returncode == 0, r.stderr[-3000:]
    for (k, n), data in first.items():
        again = run_dir / f"rounds/{k:06d}/{n}"
        if n == "proxy.pt":   # a pickle's bytes may differ where its tensors do not
            before, after = torch.load(io.BytesIO(data)), torch.load(again)
            assert before.keys() == after.keys() and all(torch.equal(before[x], after[x]) for x in before), k
        else:
            assert again.read_bytes() == data, (k, n)
    assert [untimed(m) for m in read_jsonl(run_dir / "metrics.jsonl")] == [untimed(m) for m in original]
