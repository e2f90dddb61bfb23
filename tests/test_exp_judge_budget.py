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
               f"annotate.cache={tmp_path / 'cache.jsonl'}",
               "train.learning_rate=3e-3"]   # enough to move the tiny policy's win rate between the two rounds
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
    # The table's numbers are the runs' own: sea's final win rate, and its paired differences from
    # random@1's final evaluation and from random@1's evaluation at the same judge calls (round 0:
    # by then random@1 had spent 16 calls, sea@0.5 at most 8 a round).
    runs = {arm: json.loads((out / "arms" / f"{arm}.json").read_text())["seeds"]["0"]
            for arm in ("random@1", "sea@0.5")}
    assert runs["random@1"][0]["budget/judge_calls"] == 16
    assert runs["random@1"][0]["eval/win_rate_vs_ref"] != runs["random@1"][1]["eval/win_rate_vs_ref"]
    cells = [c.strip() for c in md.split("\n| sea@0.5 | ")[1].split("\n")[0].split("|")]
    value = lambda cell: float(cell.split(" [")[0])  # noqa: E731
    low, high = (float(v) for v in cells[1].split(" [")[1].rstrip("]").split(", "))
    sea, base = runs["sea@0.5"][-1]["eval/win_rate_vs_ref"], runs["random@1"]
    assert value(cells[1]) == pytest.approx(sea, abs=1e-3) and low <= sea <= high
    assert value(cells[3]) == pytest.approx(sea - base[-1]["eval/win_rate_vs_ref"], abs=1e-3)
    assert value(cells[4]) == pytest.approx(sea - base[0]["eval/win_rate_vs_ref"], abs=1e-3)
    assert (out / "win_rate.png").read_bytes()[:4] == b"\x89PNG"
    # --only with nothing: results.md written again from the stored arms, nothing rerun.
    again = subprocess.run([*command, "--only", ""], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "\n| sea@0.5 | " in (out / "results.md").read_text(), again.stderr[-3000:]
