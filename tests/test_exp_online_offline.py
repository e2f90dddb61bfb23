"""The online-vs-offline task's prompt splits; scripts/experiments/online_offline.py end to end,
small: a reward model distilled from the rules, three arms trained by it, each evaluated by the
rules every round."""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from oaif.config import load_config
from oaif.constitution import SYSTEM_PATTERNS
from oaif.records import read_jsonl

sys.path.insert(0, str(ROOT / "scripts/experiments"))
import online_offline  # noqa: E402
from online_offline import choose_lr  # noqa: E402
from results import nested_interval  # noqa: E402

CONFIG = ROOT / "configs/experiments/online_offline_tiny.yaml"
TUNING = ROOT / "prompts/system_prompts_tuning.jsonl"


def constraint(row: dict) -> tuple[str, str]:
    """(check, what it asks: the limit or the word) of the one system-prompt rule that reads the row."""
    [found] = [(check, m.group(1)) for check, pattern in SYSTEM_PATTERNS.items()
               if (m := re.search(pattern, row["messages"][0]["content"]))]
    return found


def test_held_out_and_tuning_instructions_are_never_seen_in_training():
    cfg = load_config(CONFIG)
    splits = {name: read_jsonl(ROOT / path) for name, path in
              (("training", cfg.prompts), ("tuning", TUNING), ("held-out", cfg.eval.prompts))}
    system = {name: {r["messages"][0]["content"] for r in rows} for name, rows in splits.items()}
    assert not system["training"] & system["tuning"] and not system["training"] & system["held-out"]
    assert not system["tuning"] & system["held-out"]
    seen = {constraint(r) for r in splits["training"]}
    assert {check for check, _ in seen} == {"system_word_limit", "system_marker"}
    # The tiny policy knows only its SFT answers' sentences: every word asked for is in one of
    # them, and every limit leaves room for the shortest.
    answers = [m["content"].lower() for r in read_jsonl(ROOT / "prompts/tiny_sft.jsonl") for m in r["messages"]
               if m["role"] == "assistant"]
    words, shortest = {w for a in answers for w in re.findall(r"[a-z]+", a)}, min(len(a.split()) for a in answers)
    for name in ("tuning", "held-out"):
        kinds = {}
        for row in splits[name]:
            check, asked = constraint(row)
            kind = ("limit" if check == "system_word_limit" else "marker") + \
                (", seen value" if (check, asked) in seen else ", new value")
            assert row["category"] == kind, row["id"]
            kinds[kind] = kinds.get(kind, 0) + 1
            assert asked in words if check == "system_marker" else int(asked) >= shortest, row["id"]
        # Half the rows ask for a limit or word no training instruction states: generalising to a
        # new constraint, not only to a new wording of a trained one.
        assert kinds == {k: len(splits[name]) // 4 for k in ("limit, seen value", "limit, new value",
                                                             "marker, seen value", "marker, new value")}, name
    new = lambda rows: {constraint(r) for r in rows} - seen  # noqa: E731
    assert not new(splits["tuning"]) & new(splits["held-out"])


def test_the_interval_resamples_seeds_before_prompts():
    # Two seeds, one all losses, one all wins: a draw of the seeds alone can give either
    # extreme, so the interval spans [0, 1]; a bootstrap over the 64 prompts would give ~[0.38, 0.62].
    assert nested_interval([[0.0] * 32, [1.0] * 32], 2000) == (0.0, 1.0)
    assert nested_interval([[0.25] * 5, [0.25] * 7], 500) == (0.25, 0.25)
    low, high = nested_interval([[0.0, 1.0] * 16] * 5, 2000)
    assert 0.35 < low < 0.5 < high < 0.65
    assert nested_interval([[], []], 100) == (None, None)


def test_the_learning_rate_kept_is_the_best_that_stays_well_formed():
    row = lambda lr, win, formed: {"lr": lr, "win_rate": win, "well_formed": formed}  # noqa: E731
    rows = [row(5e-5, 0.6, 1.0), row(5e-5, 0.7, 1.0), row(1e-4, 0.8, 0.95), row(1e-4, 0.7, 0.9),
            row(2e-4, 0.9, 0.5), row(2e-4, 0.9, 0.6)]
    assert choose_lr(rows, floor=0.9) == 1e-4      # 2e-4 wins more, by broken answers
    assert choose_lr(rows, floor=0.0) == 2e-4
    assert choose_lr(rows, floor=0.99) == 5e-5     # only 5e-5 keeps its answers whole
    assert choose_lr(rows[:4], floor=1.01) == 5e-5   # none passes: the most well-formed
    assert choose_lr([row(1e-4, 0.7, None), row(5e-5, 0.7, None)], floor=0.9) == 5e-5   # a tie: the smaller
    assert choose_lr([row(1e-4, 0.8, None), row(5e-5, 0.7, None)], floor=0.9) == 1e-4   # no pattern: no floor


def test_a_wider_grid_runs_only_its_new_rates(monkeypatch, tmp_path):
    ran = []

    def fake_run(cfg, arm, seed, lr, where, validate, pattern):   # the runs themselves: the slow test below
        ran.append((arm, lr, seed))
        assert cfg.eval.prompts == "tuning.jsonl" and validate is None
        return [{"eval/win_rate_vs_ref": 0.5 + lr, "well_formed": 1.0, "eval/kl_to_ref": 1.0}]

    monkeypatch.setattr(online_offline, "run_arm", fake_run)
    args = lambda grid, seeds=(100, 101): argparse.Namespace(  # noqa: E731
        tuning_prompts="tuning.jsonl", tune_seeds=list(seeds), grid=grid, floor=0.9, out=tmp_path)
    cfg = load_config(CONFIG)
    first = online_offline.tune(cfg, args([0.1, 0.2]), None, None)
    assert len(ran) == 3 * 2 * 2 and first["chosen"] == {arm: 0.2 for arm in online_offline.ARMS}
    ran.clear()
    wider = online_offline.tune(cfg, args([0.05, 0.1, 0.2, 0.3]), None, json.loads(json.dumps(first)))
    assert sorted(ran) == sorted((arm, lr, s) for arm in online_offline.ARMS for lr in (0.05, 0.3) for s in (100, 101))
    assert wider["grid"] == [0.05, 0.1, 0.2, 0.3] and len(wider["runs"]) == 24 and len(wider["commands"]) == 2
    assert wider["chosen"] == {arm: 0.3 for arm in online_offline.ARMS}
    again = online_offline.tune(cfg, args([0.1]), None, wider)   # nothing new to run: no new command
    assert again["commands"] == wider["commands"] and again["runs"] == wider["runs"]
    with pytest.raises(SystemExit):   # other seeds: their means would not compare with the stored ones
        online_offline.tune(cfg, args([0.1], seeds=(7,)), None, first)


@pytest.mark.slow
def test_online_offline_experiment_tunes_then_compares_matched_arms(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"   # 16 system prompts keep the reward model's data small
    prompts.write_text("".join((ROOT / "prompts/system_prompts.jsonl").read_text().splitlines(keepends=True)[:16]))
    out = tmp_path / "exp"
    done = subprocess.run(
        [sys.executable, "scripts/experiments/online_offline.py", "--seeds", "0", "--tune-seeds", "100",
         "--grid", "1e-4", "--lr", "offline, repeated=2e-4", "--out", str(out), f"policy.model={tiny_model}", f"prompts={prompts}", "rounds=2",
         "prompts_per_round=8", f"annotate.model={tmp_path / 'rm'}", "reward_model.epochs=1", "eval.max_prompts=8",
         f"annotate.cache={tmp_path / 'cache.jsonl'}"],   # not the default runs/judge_cache.jsonl in the checkout
        cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "rm" / "metrics.json").read_text())["heldout_accuracy"] > 0.6
    arms = ("online", "offline", "offline, repeated")

    # Tuning: every arm on the tuning split alone; the reported runs use the rate it kept.
    tuning = json.loads((out / "tuning.json").read_text())
    assert sorted(r["arm"] for r in tuning["runs"]) == sorted(arms) and tuning["chosen"] == {a: 1e-4 for a in arms}
    for run in (out / "tuning").iterdir():
        assert {r["prompt_id"].rsplit("-", 1)[0] for r in read_jsonl(run / "eval/round_000001.jsonl")} == {"sys-tuning"}

    curves = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    assert sorted((c["arm"], c["round"]) for c in curves) == sorted((a, r) for a in arms for r in range(2))
    assert {(c["arm"], c["lr"]) for c in curves} == {("online", 1e-4), ("offline", 1e-4), ("offline, repeated", 2e-4)}
    first = {c["arm"]: c for c in curves if c["round"] == 0}
    second = {c["arm"]: c for c in curves if c["round"] == 1}
    # Round 0 trains every arm on the same pairs (the starting policy's, same seeds): at the same
    # rate, the same policy after it.
    assert len({c["pairs_kept"] for c in first.values()}) == 1
    for key in ("eval/win_rate_vs_ref", "validation/win_rate", "eval/mean_length", "well_formed"):
        assert first["online"][key] == first["offline"][key], key
    assert abs(first["online"]["eval/kl_to_ref"] - first["offline"]["eval/kl_to_ref"]) < 1e-3 * max(
        1.0, first["online"]["eval/kl_to_ref"])
    # The repeated arm annotates round 0 only and trains on those pairs again.
    assert second["offline, repeated"]["pairs_annotated"] == 0
    assert second["offline, repeated"]["pairs_kept"] == first["offline, repeated"]["pairs_kept"]
    assert second["offline"]["pairs_annotated"] > 0 and second["online"]["pairs_annotated"] > 0
    # Held-out and validation records come from their own splits.
    run = {c["arm"]: Path(c["run"]) for c in curves}
    ids = lambda path: {r["prompt_id"].rsplit("-", 1)[0] for r in read_jsonl(path)}  # noqa: E731
    assert ids(run["online"] / "eval/round_000001.jsonl") == {"sys-unseen"}
    assert ids(run["online"] / "validation/eval/round_000001.jsonl") == {"sys-tuning"}

    # Head to head: online's last answers (the ones its evaluation judged) against each other arm's,
    # the early-stopped ones at the round of their peak validation win rate.
    def answers(arm: str, r: int) -> dict:
        return {x["prompt_id"]: x["policy"] for x in read_jsonl(run[arm] / f"eval/round_{r:06d}.jsonl")}

    head_to_head = {}
    for arm in ("offline", "offline, repeated"):
        mine = [c for c in curves if c["arm"] == arm]
        sound = [c for c in mine if c["validation/well_formed"] >= tuning["floor"]] or mine
        peak = max(sound, key=lambda c: (c["validation/win_rate"], -c["round"]))["round"]
        for label, r in ((arm, 1), (f"{arm}, early-stopped", peak)):
            records = read_jsonl(out / "head_to_head" / f"{label.replace(', ', '-')}-seed0.jsonl")
            assert len(records) == 8
            assert {x["prompt_id"]: x["policy"] for x in records} == answers("online", 1)
            assert {x["prompt_id"]: x["baseline"] for x in records} == answers(arm, r)
            assert all((x["verdict"] == "identical") == (x["policy"] == x["baseline"]) for x in records)
            rate = sum({"win": 1, "tie": 0.5, "loss": 0}[x["outcome"]] for x in records) / len(records)
            head_to_head[label] = f"\n| {label} | {rate:.3f} ["   # the row of the head-to-head table

    md = (out / "results.md").read_text()
    for arm in ("online", "offline", "offline, early-stopped"):
        assert f"\n| {arm} | 0.0001 | " in md
    for arm in ("offline, repeated", "offline, repeated, early-stopped"):
        assert f"\n| {arm} | 0.0002 | " in md
    assert "Rates set by hand, not tuned** (`--lr`), over the choice above: offline, repeated 0.0002" in md
    assert all(row in md for row in head_to_head.values())
    assert "online_offline.py --seeds 0" in md and "not independent of the training signal" in md
    for png in ("win_rate.png", "length.png", "final.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
