"""Judge health (judge/* metrics): a judge built with one bias is flagged by them within two
rounds of a tiny run, and a rules judge, which reads the responses in either order alike, is
not; the report draws them in its judge plot.

Each test is one short run of the tiny policy in this process (the real vLLM engine, trainer
and sync), judged by a Python judge (`oaif.run(cfg, annotator=fn)`) or the rules backend."""

import math
from pathlib import Path

import pytest

import oaif
from oaif.pipeline.report import make_plots
from oaif.records import read_jsonl

from conftest import ROOT, oaif_main

SHORT = ["rounds=2", "prompts_per_round=8", "generate.enforce_eager=true"]


def run(tiny_model: Path, tmp_path: Path, name: str, *overrides: str, annotator=None) -> tuple[Path, list[dict]]:
    """One short run: (its run directory, its metrics rows)."""
    cfg = oaif.load_config(ROOT / "configs/tiny_cpu.yaml", [f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                                                            f"name={name}", *SHORT, *overrides])
    run_dir = oaif.run(cfg, annotator=annotator, log=lambda line: None)
    return run_dir, read_jsonl(run_dir / "metrics.jsonl")


def position_flag(m: dict) -> bool:
    """Most decisive comparisons flip with the order (docs/guides/judges.md)."""
    return m["judge/flip_rate"] is not None and m["judge/flip_rate"] >= 0.5


def length_flag(m: dict) -> bool:
    """Nearly every kept pair chose the longer response, and the judge's preference rises
    with length (P(A better) by more than 0.5 per 100 tokens)."""
    longer, slope = m["judge/longer_chosen_rate"], m["judge/length_slope"]
    return longer is not None and longer >= 0.9 and slope is not None and slope > 0.5


def first_wins(prompt_messages, response_1, response_2):
    """Position bias with a little content: it leans to the shorter response, but whichever is
    shown first wins."""
    shorter = (len(response_1) < len(response_2)) - (len(response_1) > len(response_2))
    return 0.8 + 0.1 * shorter


def longer_wins(prompt_messages, response_1, response_2):
    """Length bias: P(first better) grows with how much longer the first response is (in
    characters: the judge never sees tokens)."""
    return 1 / (1 + math.exp(-(len(response_1) - len(response_2)) / 20))


# The tiny policy writes sentences from a few templates in any order (its data:
# oaif/data/prompts/tiny_sft.jsonl), so which one opens a response has nothing to do with how
# many follow: a rule on the opening sentence reads content, not length or position.
OPENING = """name: opening
preamble: Prefer the response that opens by saying what its subject is like.
principles:
  - Open by saying what the subject is like.
rules:
  - {check: regex, pattern: '^[^.]*(common sight|simple and also surprising)', weight: 1.0}
"""


def test_a_position_biased_judge_is_flagged_by_its_flip_rate(tiny_model, tmp_path):
    _, metrics = run(tiny_model, tmp_path, "first", annotator=first_wins)
    assert len(metrics) == 2
    for m in metrics:
        # Every decisive comparison flips with the order (measured: 1.0 in both rounds), so none is kept.
        assert position_flag(m) and m["judge/flip_rate"] == 1.0 and m["judge/tie_rate"] == 0.0, m
        assert m["pairs_kept"] == 0 and m["judge/longer_chosen_rate"] is None and not length_flag(m)


def test_a_length_biased_judge_is_flagged_by_its_length_metrics_and_drawn_in_the_report(tiny_model, tmp_path):
    run_dir, metrics = run(tiny_model, tmp_path, "longer", annotator=longer_wins)
    assert len(metrics) == 2
    for m in metrics:
        # Measured: every pair kept, the longer chosen in all; slopes 1.6 and 2.4 per 100 tokens.
        assert m["pairs_kept"] >= 4 and length_flag(m), m
        assert m["judge/flip_rate"] == 0.0 and not position_flag(m)   # it reads both orders alike

    r = oaif_main("report", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    page = (run_dir / "report/report.html").read_text(encoding="utf-8")
    assert 'alt="judge.png"' in page and (run_dir / "report/judge.png").is_file()
    drawn = make_plots(metrics, tmp_path)["judge.png"]
    assert set(drawn) == {"judge/flip_rate", "judge/tie_rate", "judge/longer_chosen_rate", "judge/length_slope"}
    for key, line in drawn.items():
        assert line["y"] == pytest.approx([m[key] for m in metrics]), key


def test_a_rules_judge_that_reads_content_is_not_flagged(tiny_model, tmp_path):
    constitution = tmp_path / "opening.yaml"
    constitution.write_text(OPENING)
    _, metrics = run(tiny_model, tmp_path, "rules", "annotate.backend=rules", f"annotate.constitution={constitution}")
    assert len(metrics) == 2 and sum(m["pairs_kept"] for m in metrics) >= 2   # it did prefer some responses
    for m in metrics:
        # Measured: no flips; longer chosen in 0.33 and 0.5 of the kept pairs, slopes 0.12 and -0.19.
        assert m["judge/flip_rate"] == 0.0 and not position_flag(m) and not length_flag(m), m
