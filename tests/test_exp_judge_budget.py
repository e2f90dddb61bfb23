"""scripts/experiments/judge_budget.py end to end, small: two arms (random pairs on the full
budget, sea on half), one seed, two rounds, the rules as training judge (no reward model to
distil); the arms stay within their budgets and the table and plot are written from them."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_judge_budget_experiment_writes_arms_within_their_budgets(tiny_model, tmp_path):
    out = tmp_path / "exp"
    command = [sys.executable, "scripts/experiments/judge_budget.py", "--seeds", "0", "--out", str(out),
               f"policy.model={tiny_model}", "rounds=2", "prompts_per_round=8", "eval.max_prompts=8",
               "annotate.backend=rules", "annotate.constitution=constitutions/system_prompt.yaml",
               f"annotate.cache={tmp_path / 'cache.jsonl'}"]
    done = subprocess.run([*command, "--only", "random@1,sea@0.5"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for arm, cap in (("random@1", 16), ("sea@0.5", 8)):
        stored = json.loads((out / "arms" / f"{arm}.json").read_text())
        assert stored["command"].startswith(".venv/bin/python scripts/experiments/judge_budget.py") and stored["cpu"]
        [rows] = stored["seeds"].values()
        assert [r["round"] for r in rows] == [0, 1]
        assert all(0 < r["annotate/judge_calls"] <= cap for r in rows)
        assert rows[-1]["budget/judge_calls"] == sum(r["annotate/judge_calls"] for r in rows)
        assert all(r["eval/win_rate_vs_ref"] is not None for r in rows)
    md = (out / "results.md").read_text()
    assert "\n| random@1 | " in md and "\n| sea@0.5 | " in md and (out / "table.md").read_text() in md
    assert (out / "win_rate.png").read_bytes()[:4] == b"\x89PNG"
    # --only with nothing: results.md written again from the stored arms, nothing rerun.
    again = subprocess.run([*command, "--only", ""], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "\n| sea@0.5 | " in (out / "results.md").read_text(), again.stderr[-3000:]
