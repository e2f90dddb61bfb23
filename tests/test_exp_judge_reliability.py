"""scripts/experiments/judge_reliability.py --quick, run as a user runs it: a separate process
that samples pairs with the tiny policy and judges them with every judge of the quick setting."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "scripts/experiments/judge_reliability.py"
CONDITIONS = ["plain", "CoT", "few-shot", "CoT + few-shot"]


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
            assert r["all"][key] == pytest.approx(r["tool"][f"annotate/{key}"]), (r["judge"], r["condition"], key)
        judged = [json.loads(line) for line in (out / r["judged_file"]).open()]
        assert len(judged) == 12 and all(j["raw_a_first"] for j in judged if j["reason"] != "identical")

    rules, llm = results[0], results[1:]
    # The control: an exact rule cannot depend on the order, and reads every pair.
    assert rules["all"]["order_agreement"] == 1.0 and rules["all"]["invalid"] == 0
    assert rules["check"]["right"] == rules["check"]["labelled"] == 6   # the clear-cut pairs
    # The tiny model is no judge: next to no probability on the labels.
    assert all(r["all"]["label_mass"] < 0.05 for r in llm)
    # Both backends read the same prompt the same way: the same probabilities, order by order.
    for c in ("plain", "few-shot"):
        by = {r["judge"].split()[-1]: r for r in llm if r["condition"] == c}
        p = [[j[f"p_first_{o}_first"] for j in map(json.loads, (out / by[b]["judged_file"]).open())
              if j["reason"] != "identical" for o in "ab"] for b in ("vllm", "transformers")]
        assert p[0] == pytest.approx(p[1], abs=1e-3), c
    # Table rows: one per judge x condition in each of the two tables.
    assert text.count(f"| {tiny_model.name} vllm | CoT + few-shot |") == 2
    assert text.count("| rules (correct.yaml) | n/a |") == 2


def test_a_missing_model_says_how_to_build_it(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "x"),
                           f"policy.model={tmp_path / 'no-such-model'}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert "policy.model" in done.stderr and "bash scripts/demo.sh" in done.stderr
    assert not (tmp_path / "x").exists()   # nothing written before the inputs are checked
