"""eval.live_prompts: a cheap held-out evaluation every round between full ones, on a slice of
the prompts that moves each round, with its interval; the report draws it."""

import math

from oaif.pipeline.report import make_plots
from oaif.records import read_jsonl

from conftest import oaif_main


def test_live_evaluation_takes_a_new_slice_each_round_and_the_full_one_stays(tiny_model, tmp_path):
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=live",
                  "rounds=4", "eval.every=2", "eval.live_prompts=8", "eval.annotate.backend=rules",
                  "eval.annotate.constitution=correct", "eval.prompts=heldout_qa")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "live"
    metrics = read_jsonl(run / "metrics.jsonl")
    # Rounds 1 and 3 are full evaluations (eval.every=2, and the last); 0 and 2 live ones.
    assert [("eval/win_rate_vs_ref" in m, "eval/live_win_rate" in m) for m in metrics] == \
        [(False, True), (True, False), (False, True), (True, False)]
    for m in (metrics[0], metrics[2]):
        assert m["eval/live_prompts"] == 8
        assert m["eval/live_win_rate_ci_low"] <= m["eval/live_win_rate"] <= m["eval/live_win_rate_ci_high"]
    slices = [[c["prompt_id"] for c in read_jsonl(run / f"eval/live_{k:06d}.jsonl")] for k in (0, 2)]
    assert all(len(s) == len(set(s)) == 8 for s in slices) and set(slices[0]) != set(slices[1])
    (tmp_path / "plots").mkdir()
    drawn = make_plots(metrics, tmp_path / "plots")["eval.png"]["eval/live_win_rate"]   # what the report draws
    assert drawn["y"][0] == metrics[0]["eval/live_win_rate"] and math.isnan(drawn["y"][1])
    assert drawn["low"][2] == metrics[2]["eval/live_win_rate_ci_low"]
