"""scripts/experiments/steering.py as a user runs it (--quick: the tiny policy, 2 rounds, a
`concise` arm against a `detailed` one): the folder holds results.md and the plots, the table
agrees with the arms' own records, and the two constitutions pulled the lengths apart."""

import subprocess
import sys

import pytest

from oaif.records import read_jsonl

from conftest import ROOT


def row_of(table: str, arm: str) -> list[str]:
    [row] = [line for line in table.splitlines() if line.startswith(f"| `{arm}` | `constitutions/")]
    return [cell.strip() for cell in row.strip("|").split("|")]


@pytest.mark.slow
def test_steering_quick_writes_a_table_and_plots_that_match_the_runs(tiny_model, tmp_path):
    out = tmp_path / "steering"
    r = subprocess.run([sys.executable, "scripts/experiments/steering.py", "--quick", "--out", str(out),
                        f"policy.model={tiny_model}", "threads=1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = (out / "results.md").read_text()
    for png in ("lengths.png", "win_rate.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in text

    final = {}
    for arm in ("detailed", "concise"):
        metrics = read_jsonl(out / arm / "metrics.jsonl")
        assert [m["round"] for m in metrics] == [0, 1]
        last = metrics[-1]
        row = row_of(text, arm)
        assert row[2] == f"{sum(m['pairs_kept'] for m in metrics)} / {sum(m['pairs_kept'] + m['pairs_dropped'] for m in metrics)}"
        assert row[3] == f"{metrics[0]['generate/mean_length']:.1f} → {last['generate/mean_length']:.1f}"
        assert row[5] == f"{last['eval/baseline_mean_length']:.1f} → {last['eval/mean_length']:.1f}"
        assert row[8].startswith(f"{last['eval/win_rate_vs_ref']:.3f} [") and f"({last['eval/wins']} W" in row[8]
        assert row[10] == f"{last['eval/kl_to_ref']:.2f}"
        final[arm] = last
    # Same start, prompts and seed: round 0 drew the same samples in both arms ...
    assert (read_jsonl(out / "concise" / "rounds" / "000000" / "samples.jsonl")
            == read_jsonl(out / "detailed" / "rounds" / "000000" / "samples.jsonl"))
    # ... and after training the constitutions pulled the lengths apart, the ratio column says so.
    assert final["concise"]["generate/mean_length"] < final["detailed"]["generate/mean_length"]
    assert final["concise"]["eval/mean_length"] < final["detailed"]["eval/mean_length"]
    assert row_of(text, "concise")[6] == f"{final['concise']['eval/mean_length'] / final['detailed']['eval/mean_length']:.2f}"
    assert row_of(text, "detailed")[6] == "1.00"


def test_steering_refuses_bad_arms_and_per_arm_keys():
    script = [sys.executable, "scripts/experiments/steering.py", "--quick"]
    for args, message in ([["--arms", "only=constitutions/concise.yaml"], "at least two arms"],
                          [["--arms", "a=constitutions/nope.yaml,b=constitutions/concise.yaml"], "not found"],
                          [["annotate.constitution=constitutions/helpful.yaml"], "set per arm"],
                          [["policy.model=models/absent"], "bash scripts/demo.sh"]):
        r = subprocess.run([*script, *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr[-2000:])
