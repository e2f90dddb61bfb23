"""Tier 3: evaluation through the CLI on the tiny model, in the loop and with `oaif eval`."""

import pytest

from oaif.records import read_jsonl

from conftest import oaif_main

EVAL = ["eval.prompts=prompts/heldout.jsonl", "eval.max_prompts=40"]


def same_comparisons(a: list[dict], b: list[dict]) -> None:
    """Two evaluations of the same policy: the same responses, verdicts and KL."""
    assert [(r["prompt_id"], r["policy"], r["baseline"], r["outcome"]) for r in a] == \
           [(r["prompt_id"], r["policy"], r["baseline"], r["outcome"]) for r in b]
    assert [r["kl_to_ref"] for r in a] == pytest.approx([r["kl_to_ref"] for r in b], abs=1e-3)


def test_concise_run_beats_its_start_in_the_loop_and_in_oaif_eval(concise_run, tiny_model, tmp_path):
    run_dir, r = concise_run   # evaluated on EVAL's prompts
    assert "graded by the judge it was trained to please" in r.stdout   # eval.annotate unset
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [("eval/win_rate_vs_ref" in m) for m in metrics] == [False] * 3 + [True] + [False] * 3 + [True]
    final = metrics[-1]
    assert final["eval/win_rate_vs_ref"] > 0.6 and final["eval/win_rate_ci_low"] > 0.5, final
    assert final["eval/mean_length"] < final["eval/baseline_mean_length"]
    assert final["eval/kl_to_ref"] > metrics[3]["eval/kl_to_ref"] > 0   # the policy moves away from its start
    # The concise judge prefers length alone: with length controlled for, the win rate moves
    # toward 1/2 (a length-controlled rate that ignored length would stay with the raw one).
    assert abs(final["eval/lc_win_rate_vs_ref"] - 0.5) < 0.5 * abs(final["eval/win_rate_vs_ref"] - 0.5), final
    assert final["eval/wins"] + final["eval/ties"] + final["eval/losses"] + final["eval/invalid"] == 40
    assert "eval after round 7: win" in r.stdout
    baseline = read_jsonl(run_dir / "eval/baseline.jsonl")
    in_loop = read_jsonl(run_dir / "eval/round_000007.jsonl")
    assert len(baseline) == len(in_loop) == 40 and [b["text"] for b in baseline] == [c["baseline"] for c in in_loop]
    for c in in_loop:
        assert [o["first"] for o in c["orders"]] == ["a", "b"] or c["verdict"] == "identical"

    # oaif eval on the run's last checkpoint (the default) rebuilds both sides in a fresh
    # engine: the same greedy responses and verdicts as the in-loop evaluation.
    r = oaif_main("eval", str(run_dir / "config.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    # Written apart from eval/ (which a resume rewinds): the in-loop file is left as it was.
    assert "eval: win" in r.stdout and f"comparisons in {run_dir}/evals/round_000007.jsonl" in r.stdout
    assert read_jsonl(run_dir / "eval/round_000007.jsonl") == in_loop
    same_comparisons(read_jsonl(run_dir / "evals/round_000007.jsonl"), in_loop)
    summary = read_jsonl(run_dir / "evals/round_000007.summary.jsonl")[0]
    assert summary["eval/win_rate_vs_ref"] == pytest.approx(final["eval/win_rate_vs_ref"])

    # The start against itself: every response identical, a win rate of exactly 1/2, no KL.
    out = tmp_path / "self.jsonl"
    r = oaif_main("eval", str(run_dir / "config.yaml"), f"eval.policy={tiny_model}", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_jsonl(out)
    assert all(c["verdict"] == "identical" for c in rows)
    m = read_jsonl(tmp_path / "self.summary.jsonl")[0]
    assert m["eval/win_rate_vs_ref"] == m["eval/lc_win_rate_vs_ref"] == 0.5
    assert m["eval/kl_to_ref"] == pytest.approx(0, abs=1e-4)


def test_lora_checkpoint_is_merged_for_eval(tiny_model, tmp_path):
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 "name=lora", "rounds=2", "eval.every=2", "train.lora.enabled=true", "train.learning_rate=2e-3",
                 "eval.annotate.backend=rules", *EVAL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained to please" not in r.stdout   # eval.annotate set: no warning
    in_loop = read_jsonl(tmp_path / "lora/eval/round_000001.jsonl")
    assert any(c["verdict"] != "identical" for c in in_loop), "the adapter should change some answers"
    r = oaif_main("eval", str(tmp_path / "lora/config.yaml"), "eval.annotate.backend=rules",
                 f"eval.policy={tmp_path}/lora/checkpoints/round_000001", "--out", str(tmp_path / "cli.jsonl"))
    assert r.returncode == 0, r.stderr[-3000:]
    same_comparisons(read_jsonl(tmp_path / "cli.jsonl"), in_loop)


def test_eval_errors_name_what_to_set(tiny_model, tmp_path):
    r = oaif_main("eval", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=none",
                 *EVAL)
    assert r.returncode == 2 and "has no checkpoints: set eval.policy=PATH" in r.stderr
    r = oaif_main("eval", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"eval.policy={tiny_model}", *EVAL)
    assert r.returncode == 2 and "is not a checkpoint of a run: pass --out FILE" in r.stderr
    r = oaif_main("eval", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"eval.policy={tiny_model}",
                 "eval.prompts=nope.jsonl",
                 "--out", str(tmp_path / "x.jsonl"))
    assert r.returncode == 2 and "prompt file nope.jsonl not found" in r.stderr
    assert not (tmp_path / "x.jsonl").exists()
