"""The online-vs-offline task's prompt splits; scripts/experiments/online_offline.py end to end,
small: a reward model distilled from the rules, three arms trained by it, each evaluated by the
rules every round."""

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from oaif.config import load_config
from oaif.constitution import SYSTEM_PATTERNS
from oaif.records import read_jsonl

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
