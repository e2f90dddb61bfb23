"""scripts/experiments/judge_reliability.py --quick, run as a user runs it: a separate process
that samples pairs with the tiny policy and judges them with every judge of the quick setting;
and its measures (intervals, the order-averaged probability, the label-mass floor) on answers a
test chooses."""

import json
import subprocess
import sys

import pytest

from oaif.annotate.base import Answer, Identity
from oaif.annotate.files import judge_rows

from conftest import ROOT

SCRIPT = ROOT / "scripts/experiments/judge_reliability.py"
CONDITIONS = ["plain", "CoT", "few-shot", "CoT + few-shot"]
RATES = ("order_agreement", "first_position_rate", "invalid_rate", "label_mass", "dropped_by_filter", "below_floor",
         "right_rate", "sign_accuracy", "margin")

sys.path.insert(0, str(SCRIPT.parent))
import judge_reliability as jr  # noqa: E402
from results import fmt_ci, wilson  # noqa: E402


@pytest.mark.slow   # ~80 s: seven judges' engines start one after another
def test_quick_run_writes_a_table_and_a_plot_whose_numbers_add_up(tiny_model, tmp_path):
    out = tmp_path / "judge"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), f"policy.model={tiny_model}"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (out / "results.md").read_text()
    assert (out / "judge_reliability.png").stat().st_size > 10_000
    assert f"--quick --out {out}" in text and "![" in text

    results = json.loads((out / "metrics.json").read_text())
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").open()]
    assert len(pairs) == 6 and all(p["a"] and p["b"] and p["references"] for p in pairs)
    # One row per judge x condition: the rules control once, the vllm judge under every condition,
    # the transformers judge without chain of thought.
    assert [(r["judge"], r["condition"]) for r in results] == (
        [("rules (correct.yaml)", "n/a")] + [(f"{tiny_model.name} vllm", c) for c in CONDITIONS]
        + [(f"{tiny_model.name} transformers", c) for c in ("plain", "few-shot")])
    for r in results:
        for part, n in (("heldout", 6), ("check", 6), ("all", 12)):
            m = r[part]
            assert m["kept"] + m["disagree"] + m["tie"] + m["invalid"] + m["identical"] == m["pairs"] == n, (r, part)
            assert m["right"] <= m["labelled"]
        # The per-set numbers use the tool's definitions: over all rows they are the tool's own.
        for key in ("order_agreement", "first_position_rate", "invalid_rate", "label_mass"):
            assert r["all"][key]["value"] == pytest.approx(r["tool"][f"annotate/{key}"]), (r["condition"], key)
        # Every rate and mean has its interval around it; a rate over too few pairs is not shown as one.
        for part in ("heldout", "check", "all", "heldout_floor", "check_floor"):
            for key in RATES:
                d = r[part][key]
                assert d["value"] is None or d["low"] <= d["value"] <= d["high"], (r["judge"], part, key, d)
        row = next(line for line in text.splitlines() if line.startswith(f"| {r['judge']} | {r['condition']} |"))
        for key in ("order_agreement", "first_position_rate", "invalid_rate", "label_mass", "right_rate"):
            d = r["heldout"][key]
            shown = f"n/a ({d['n']} pair" if d["n"] < jr.MIN_PAIRS else f"{d['value']:.2f} [{d['low']:.2f}, "
            assert shown in row, (key, d, row)
        judged = [json.loads(line) for line in (out / r["judged_file"]).open()]
        assert len(judged) == 12 and all(j["raw_a_first"] for j in judged if j["reason"] != "identical")

    rules, llm = results[0], results[1:]
    # The control: an exact rule cannot depend on the order, and reads every pair.
    assert rules["all"]["order_agreement"]["value"] == 1.0 and rules["all"]["invalid"] == 0
    assert rules["check"]["right"] == rules["check"]["labelled"] == 6   # the clear-cut pairs
    # The tiny model is no judge: next to no probability on the labels, so the floor (0.5 in the
    # config) makes every one of its judged pairs invalid, and keeps none; the rules have no label mass.
    assert all(r["all"]["label_mass"]["value"] < 0.05 for r in llm)
    for r in llm:
        n_judged = r["heldout"]["pairs"] - r["heldout"]["identical"]
        assert r["heldout_floor"]["below_floor"]["value"] == 1.0 and r["heldout_floor"]["invalid"] == n_judged
        assert r["heldout_floor"]["kept"] == 0
    assert rules["heldout_floor"]["kept"] == rules["heldout"]["kept"]
    assert rules["heldout_floor"]["below_floor"]["value"] == 0
    # Both backends read the same prompt the same way: the same probabilities, order by order.
    for c in ("plain", "few-shot"):
        by = {r["judge"].split()[-1]: r for r in llm if r["condition"] == c}
        p = [[j[f"p_first_{o}_first"] for j in map(json.loads, (out / by[b]["judged_file"]).open())
              if j["reason"] != "identical" for o in "ab"] for b in ("vllm", "transformers")]
        assert p[0] == pytest.approx(p[1], abs=1e-3), c
    # Table rows: one per judge x condition in each of the four tables.
    assert text.count(f"| {tiny_model.name} vllm | CoT + few-shot |") == 4
    assert text.count("| rules (correct.yaml) | n/a |") == 4


def test_a_missing_model_says_how_to_build_it(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "x"),
                           f"policy.model={tmp_path / 'no-such-model'}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert "policy.model" in done.stderr and "bash scripts/demo.sh" in done.stderr
    assert not (tmp_path / "x").exists()   # nothing written before the inputs are checked


class ScriptedJudge:
    """Stands in for an LLM judge: the answers (P(first better), label mass) a test chooses."""
    identity = Identity("scripted", "none", "c", "h1", "h2")

    def __init__(self, answers):
        self.answers, self.stats = list(answers), {}

    def judge(self, requests):
        return [Answer(p, f"p={p}", mass) for p, mass in self.answers[:len(requests)]]


# Four labelled pairs, both orders each: (P(first better), label mass).
ANSWERS = [(0.9, 0.6), (0.8, 0.7),     # always the first, but less so when b (wrong) is first: signal
           (0.7, 0.2), (0.6, 0.9),     # a mostly off-label answer in one order
           (0.3, 0.8), (0.8, 0.8),     # agreed and right: b better in both orders
           (0.55, 0.1), (0.55, 0.1)]   # pure position bias, below any floor
ROWS = [{"prompt": "q", "a": f"x{k}", "b": f"y{k}", "correct": c} for k, c in enumerate("aaba")]


def test_the_order_averaged_probability_keeps_the_signal_the_both_orders_filter_drops():
    out, _ = judge_rows(ScriptedJudge(ANSWERS), ROWS)
    m = jr.measure(out)
    assert [r["reason"] for r in out] == ["disagree", "disagree", "b", "disagree"]
    assert m["order_agreement"]["value"] == pytest.approx(1 / 4) and m["right"] == 1
    # P(correct) per pair: (0.9 + 0.2) / 2, (0.7 + 0.4) / 2, 1 - (0.3 + 0.2) / 2, (0.55 + 0.45) / 2:
    # three pairs the filter drops still lean the right way, or not at all.
    assert m["sign"] == {"right": 3, "tie": 1, "wrong": 0}
    assert m["sign_accuracy"]["value"] == pytest.approx(3.5 / 4)
    assert m["margin"]["value"] == pytest.approx((0.05 + 0.05 + 0.25 + 0) / 4)
    assert m["first_position_rate"]["value"] == pytest.approx(7 / 8) and m["first_position_rate"]["n"] == 4


def test_the_floor_applied_to_recorded_answers_is_the_tools_floor():
    judge = ScriptedJudge(ANSWERS)
    for floor in (0.15, 0.5, 0.75):
        replayed = jr.with_floor(judge_rows(judge, ROWS)[0], floor)
        tool, _ = judge_rows(judge, ROWS, min_label_mass=floor)
        for key in ("reason", "verdict", "p_a", "p_first_a_first", "p_first_b_first", "raw_a_first", "raw_b_first"):
            assert [r[key] for r in replayed] == [r[key] for r in tool], (floor, key)
    m = jr.measure(jr.with_floor(judge_rows(judge, ROWS)[0], 0.5))
    assert m["below_floor"]["value"] == pytest.approx(2 / 4) and m["invalid"] == 2 and m["kept"] == 1


def test_intervals_and_thin_rates():
    assert wilson(0, 30) == (0.0, pytest.approx(3.8416 / 33.8416, abs=1e-4))   # z² / (n + z²) at k = 0
    assert wilson(14, 14)[0] == pytest.approx(14 / (14 + 3.8416), abs=1e-4)
    low, high = wilson(7, 14)
    assert low < 0.5 < high and 0.5 - low == pytest.approx(high - 0.5)
    assert wilson(0, 0) == (None, None)
    assert fmt_ci(1.0, 0.2, 1.0, 1, min_n=5) == "n/a (1 pair)"
    assert fmt_ci(None, None, None, 0, min_n=5) == "n/a (0 pairs)"
    assert fmt_ci(0.5, 0.25, 0.75, 14, min_n=5) == "0.50 [0.25, 0.75]"
