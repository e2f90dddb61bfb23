"""scripts/experiments/online_offline.py end to end, small: a reward model distilled from the
rules, three arms trained by it, each evaluated by the rules every round."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_online_offline_experiment_writes_matched_arms(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"   # 16 system prompts keep the reward model's data small
    prompts.write_text("".join((ROOT / "prompts/system_prompts.jsonl").read_text().splitlines(keepends=True)[:16]))
    out = tmp_path / "exp"
    done = subprocess.run(
        [sys.executable, "scripts/experiments/online_offline.py", "--seeds", "0", "--out", str(out),
         f"policy.model={tiny_model}", f"prompts={prompts}", "rounds=2", "prompts_per_round=8",
         f"annotate.model={tmp_path / 'rm'}", "reward_model.epochs=1", "eval.max_prompts=8",
         f"annotate.cache={tmp_path / 'cache.jsonl'}"],   # not the default runs/judge_cache.jsonl in the checkout
        cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "rm" / "metrics.json").read_text())["heldout_accuracy"] > 0.6

    curves = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    arms = ("online", "offline", "offline, repeated")
    assert sorted((c["arm"], c["round"]) for c in curves) == sorted((a, r) for a in arms for r in range(2))
    first = {c["arm"]: c for c in curves if c["round"] == 0}
    second = {c["arm"]: c for c in curves if c["round"] == 1}
    # Round 0 trains every arm on the same pairs (the starting policy's, same seeds): same policy after it.
    assert len({c["pairs_kept"] for c in first.values()}) == 1
    for key in ("eval/win_rate_vs_ref", "eval/mean_length", "well_formed"):
        assert len({c[key] for c in first.values()}) == 1, key
    kls = [c["eval/kl_to_ref"] for c in first.values()]
    assert max(kls) - min(kls) < 1e-3 * max(1.0, max(kls))
    # The repeated arm annotates round 0 only and trains on those pairs again.
    assert second["offline, repeated"]["pairs_annotated"] == 0
    assert second["offline, repeated"]["pairs_kept"] == first["offline, repeated"]["pairs_kept"]
    assert second["offline"]["pairs_annotated"] > 0 and second["online"]["pairs_annotated"] > 0

    md = (out / "results.md").read_text()
    for arm in arms:
        assert f"\n| {arm} | " in md
    assert "online_offline.py --seeds 0" in md
    for png in ("win_rate.png", "kl_length.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
