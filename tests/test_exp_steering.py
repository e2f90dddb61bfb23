"""scripts/experiments/steering.py as a user runs it (--quick: the tiny policy, 2 rounds, a
`control` arm against a `concise` one, two seeds): the split, the checkpoint chosen on
validation, the test tables agreeing with the runs' own records, the matched signal and the
length rule's pull; and its paired statistics on hand-computed numbers."""

import math
import subprocess
import sys

import pytest

import oaif
from oaif.constitution import matches_reference
from oaif.records import read_jsonl

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts" / "experiments"))
from results import paired_difference, sign_test   # noqa: E402
import steering   # noqa: E402

ARMS, SEEDS = ("control", "concise"), (0, 1)


def row_of(text: str, start: str) -> list[str]:
    """The cells of the one table row that starts with `start`."""
    [row] = [line for line in text.splitlines() if line.startswith(start)]
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_paired_difference_and_sign_test_on_hand_computed_numbers():
    # One seed, 10 prompts: 3 went wrong → right (b), 1 right → wrong (c), 6 unchanged.
    b, c, n = 3, 1, 10
    mean, low, high = paired_difference([1, 1, 1, -1] + [0] * 6)
    half = 1.96 * math.sqrt(b + c - (b - c) ** 2 / n) / n   # the paired-proportions Wald interval
    assert mean == pytest.approx(0.2) and low == pytest.approx(0.2 - half) and high == pytest.approx(0.2 + half)
    assert sign_test([1, 1, 1, -1] + [0] * 6) == pytest.approx(2 * (1 + 4) / 16)   # McNemar exact: 2·P(X ≤ 1), X ~ Bin(4, ½)
    assert sign_test([1] * 8) == pytest.approx(2 / 256)
    assert sign_test([0, 0]) == 1.0 and sign_test([1, -1]) == 1.0
    # Three seeds averaged per prompt: the prompt is the unit, its mean difference the item.
    mean, low, high = paired_difference([2 / 3, -1 / 3, 0, 1])
    sd = math.sqrt(sum((d - 1 / 3) ** 2 for d in [2 / 3, -1 / 3, 0, 1]) / 4)
    assert mean == pytest.approx(1 / 3) and high - low == pytest.approx(2 * 1.96 * sd / 2)
    assert paired_difference([]) == (None, None, None)


def test_split_is_fixed_disjoint_and_refuses_what_cannot_be_measured():
    base = oaif.load_config(steering.QUICK_CONFIG)
    validation, test = steering.split_held_out(base)
    assert (len(validation), len(test)) == (16, 32)
    assert {p.id for p in validation + test} == {f"qa-{i:04d}" for i in range(1, 49)}   # the first 48, each once
    assert steering.split_held_out(base) == (validation, test)                          # the same draw every time
    for overrides, message in ([["eval.prompts=prompts/tiny_prompts.jsonl"], "needs references"],
                               [["eval.prompts=prompts/train_qa.jsonl"], "shares 48 prompts with the training"]):
        with pytest.raises(SystemExit, match=message):
            steering.split_held_out(oaif.load_config(steering.QUICK_CONFIG, overrides))


@pytest.mark.slow
def test_steering_quick_chooses_on_validation_reports_test_matches_the_runs_and_resumes(tiny_model, tmp_path):
    out = tmp_path / "steering"
    # From a folder outside the checkout, as a user with a clone elsewhere runs it.
    command = [sys.executable, str(ROOT / "scripts/experiments/steering.py"), "--quick", "--out", str(out),
               f"policy.model={tiny_model.resolve()}", "threads=1"]
    r = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = (out / "results.md").read_text()
    assert "read back" not in text
    for png in ("lengths.png", "validation.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in text
    validation, test = (read_jsonl(out / "split" / f"{part}.jsonl") for part in ("validation", "test"))
    references = {p["id"]: p["references"] for p in validation + test}
    test_ids = {p["id"] for p in test}

    runs = {}
    for arm in ARMS:
        for seed in SEEDS:
            run = out / arm / f"seed{seed}"
            metrics = read_jsonl(run / "metrics.jsonl")
            assert [m["round"] for m in metrics] == [0, 1]
            # Validation accuracy at each evaluated round, recounted; the best (later on a tie) was chosen ...
            accuracy = {k: sum(matches_reference(e["policy"], references[e["prompt_id"]]) for e in rows) / len(rows)
                        for k in (0, 1) for rows in [read_jsonl(run / "eval" / f"round_{k:06d}.jsonl")]}
            assert all({e["prompt_id"] for e in read_jsonl(run / "eval" / f"round_{k:06d}.jsonl")}
                       <= {p["id"] for p in validation} for k in (0, 1))
            chosen = max(accuracy, key=lambda k: (accuracy[k], k))
            assert (run / "checkpoints" / "round_000000").is_dir() and (run / "checkpoints" / "round_000001").is_dir()
            # ... and that checkpoint alone answered the test set.
            assert sorted(p.name for p in (run / "evals").iterdir()) == [f"round_{chosen:06d}.jsonl",
                                                                      f"round_{chosen:06d}.summary.jsonl"]
            records = read_jsonl(run / "evals" / f"round_{chosen:06d}.jsonl")
            assert {e["prompt_id"] for e in records} == test_ids
            ok = lambda side: [matches_reference(e[side], references[e["prompt_id"]]) for e in records]  # noqa: E731
            start, final = ok("baseline"), ok("policy")
            ups = sum(f and not s for s, f in zip(start, final))
            downs = sum(s and not f for s, f in zip(start, final))
            row = row_of(text, f"| `{arm}` | {seed} |")
            assert f"**{chosen}: {accuracy[chosen]:.2f}**" in row[2]
            assert row[3] == f"{sum(start) / len(start):.3f} → {sum(final) / len(final):.3f}"
            assert row[4] == f"{ups} / {downs}"
            p = 2 * sum(math.comb(ups + downs, k) for k in range(min(ups, downs) + 1)) / 2 ** (ups + downs)
            assert row[6] == f"{min(1.0, p):.3g}"
            assert row[7] == f"{sum(e['policy_tokens'] for e in records) / len(records):.1f}"
            runs[arm, seed] = {"metrics": metrics, "chosen": chosen, "records": records}

    for arm in ARMS:
        row = row_of(text, f"| `{arm}` | `constitutions/")
        kept = [sum(m["pairs_kept"] for m in runs[arm, s]["metrics"]) for s in SEEDS]
        assert row[2].startswith(f"{sum(kept) / len(kept):.1f} ± ")
        assert row[3] == " ".join(str(runs[arm, s]["chosen"]) for s in SEEDS)
    for seed in SEEDS:
        # Same start, prompts and seed: round 0 drew the same samples in both arms ...
        samples = [read_jsonl(out / arm / f"seed{seed}" / "rounds" / "000000" / "samples.jsonl") for arm in ARMS]
        assert samples[0] == samples[1]
        # ... and the coin decides every pair the length rule decides (and those of equal length): the
        # control arm's signal is at least the concise arm's.
        kept = [runs[arm, seed]["metrics"][0]["pairs_kept"] for arm in ARMS]
        assert kept[0] >= kept[1] > 0
    # The length rule, not the amount of signal, made the concise arm's test answers shorter.
    length = {arm: sum(e["policy_tokens"] for s in SEEDS for e in runs[arm, s]["records"]) for arm in ARMS}
    assert length["concise"] < length["control"]

    # Resumed, as after an interruption: a run whose test answers are in (its steering.json, with
    # the same resolved config) is read back, untouched; one without is run again. The report is
    # the same but for its first line and the note that says so.
    written = lambda: {(a, s): (out / a / f"seed{s}" / "metrics.jsonl").stat().st_mtime_ns  # noqa: E731
                       for a in ARMS for s in SEEDS}
    before = written()
    (out / "concise" / "seed1" / steering.DONE).unlink()
    r = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after, again = written(), (out / "results.md").read_text()
    assert [k for k in before if before[k] != after[k]] == [("concise", SEEDS[1])]
    assert "3 of the 4 runs finished in earlier invocations" in again
    def body(text: str) -> list[str]:   # from the first section; the arm table's last cell is the minutes per run
        lines = text.splitlines()
        return [line.rsplit("|", 2)[0] if "| `constitutions/" in line else line
                for line in lines[lines.index(next(x for x in lines if x.startswith("## "))):]
                if line and "read back" not in line]

    assert body(again) == body(text)
    # Another config is another experiment: nothing is read back.
    r = subprocess.run([*command, "rounds=1"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and "read back" not in (out / "results.md").read_text(), r.stderr[-3000:]


def test_steering_refuses_bad_arms_seeds_and_per_run_keys(tmp_path):
    for call, arg, message in ((steering.parse_arms, "only=constitutions/concise.yaml", "at least two arms"),
                               (steering.parse_arms, "a=constitutions/nope.yaml,b=constitutions/concise.yaml", "not found"),
                               (steering.parse_seeds, "0,0", "repeats a seed"),
                               (steering.parse_seeds, "0,x", "not a comma-separated list"),
                               (steering.check_overrides, ["seed=3"], "set per run")):
        with pytest.raises(SystemExit, match=message):
            call(arg)
    # As a user runs it: a missing model is named with the command that builds it, before anything is written.
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "scripts/experiments/steering.py", "--quick", "--out", str(out),
                        "policy.model=models/absent"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "bash scripts/demo.sh" in r.stderr, r.stderr[-2000:]
    assert not out.exists()
