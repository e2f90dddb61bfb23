"""Length-debiased labels (annotate.length_debias_window, oaif/annotate/length.py): the fit
recovers a judge's length effect and finds none where there is none; taken off the answers,
it turns a verdict won on length alone into no verdict and keeps one won on content; in a
run, a judge that rewards length no longer mostly picks the longer response, and a resume
refills the window from the run's judgments. The drift in length with and without it over
a longer run is an experiment (scripts/experiments/hacking.py)."""

import math
import random
import re

import pytest

import oaif
from oaif.annotate.judge import judge_pairs
from oaif.annotate.length import LengthDebias, fit
from oaif.annotate.python_fn import FunctionAnnotator
from oaif.annotate.stage import AnnotateStage
from oaif.constitution import load_constitution
from oaif.records import Sample, read_jsonl

from conftest import ROOT

OPENING = re.compile(r"^[^.]*(common sight|simple and also surprising)")   # tests/test_judge_health.py's content rule


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def verbose_judge(prompt_messages, response_1, response_2):
    """Content (the opening sentence, worth 2 logits) plus a length bias worth up to 3 logits
    (characters: the judge never sees tokens). Its soft labels train (train.loss soft)."""
    content = bool(OPENING.search(response_1)) - bool(OPENING.search(response_2))
    return sigmoid(2 * content + 3 * math.tanh((len(response_1) - len(response_2)) / 40))


@pytest.mark.parametrize("effect", [0.0, 1.5, -2.0])
def test_the_fit_recovers_the_length_effect(effect):
    rng = random.Random(0)
    differences = [rng.randint(-60, 60) for _ in range(400)]
    scale = (sum(d * d for d in differences) / len(differences)) ** 0.5
    points = [(d, sigmoid(effect * math.tanh(d / scale))) for d in differences]   # soft labels, as judges give
    fitted, fitted_scale = fit(points)
    assert fitted == pytest.approx(effect, abs=0.1)
    assert effect == 0 or fitted_scale == pytest.approx(scale, rel=0.01)   # the spread is among those tried
    assert fit(points[:10]) == (0.0, 1.0)   # too few pairs: nothing is removed


def sample(text: str, index: int, tokens: int) -> Sample:
    return Sample(round=0, policy_version=0, prompt_id="p", messages=[{"role": "user", "content": "q"}], index=index,
                  text=text, prompt_token_ids=[1], token_ids=[7] * tokens, finish_reason="stop")


def test_a_label_won_on_length_alone_goes_to_even_and_one_won_on_content_stays():
    judge = FunctionAnnotator(lambda m, r1, r2: sigmoid(3 * math.tanh((len(r1) - len(r2)) / 30)
                                                       + 2 * (("good" in r1) - ("good" in r2))),
                              load_constitution("concise"))
    rng = random.Random(1)
    debias = LengthDebias(window=512)
    # A window of the judge's answers on pairs that differ only in length (one token per character).
    for _ in range(4):
        pairs = [(sample("x" * (n := rng.randint(5, 80)), 0, n), sample("x" * (m := rng.randint(5, 80)), 1, m))
                 for _ in range(32)]
        judge_pairs(judge, pairs, 0, 0, debias=debias)
    assert debias.effect == pytest.approx(3, abs=0.5)
    length_only = (sample("y" * 80, 0, 80), sample("z" * 10, 1, 10))
    content = (sample("good" + "w" * 6, 0, 10), sample("v" * 80, 1, 80))   # shorter, but it says the right thing
    raw = judge_pairs(judge, [length_only, content], 0, 0)
    assert [j.verdict for j in raw.judgments] == ["a", "b"]   # the judge alone: the longer wins both
    assert raw.judgments[0].p_a > 0.9
    debiased = judge_pairs(judge, [length_only, content], 0, 0, debias=debias)
    assert abs(debiased.judgments[0].p_a - 0.5) < 0.15, debiased.judgments[0]   # measured 0.60 (raw 0.95)
    assert debiased.judgments[1].verdict == "a" and debiased.judgments[1].p_a > 0.75, debiased.judgments[1]
    assert debiased.pairs[-1].chosen == content[0].text
    # The judgments keep the judge's own answers: what the next fit reads.
    assert debiased.judgments[0].orders == raw.judgments[0].orders


def test_a_run_with_a_verbose_judge_stops_choosing_the_longer_and_a_resume_refills_the_window(tiny_model, tmp_path):
    overrides = [f"policy.model={tiny_model}", f"output_dir={tmp_path}", "rounds=3", "prompts_per_round=16",
                 "generate.enforce_eager=true", "train.checkpoint_every=1", "train.loss=soft"]
    metrics = {}
    for name, window in (("plain", 0), ("debiased", 1000)):
        cfg = oaif.load_config(ROOT / "configs/tiny_cpu.yaml", [*overrides, f"name={name}",
                                                                f"annotate.length_debias_window={window}"])
        run_dir = oaif.run(cfg, annotator=verbose_judge, log=lambda line: None)
        metrics[name] = read_jsonl(run_dir / "metrics.jsonl")
    plain, debiased = metrics["plain"], metrics["debiased"]
    assert all("judge/length_effect" not in m for m in plain)
    assert all(m["judge/length_effect"] > 1 for m in debiased[1:]), [m.get("judge/length_effect") for m in debiased]
    # What the soft labels pull towards: P(a better) - 0.5 signed by which response is longer,
    # averaged over the judged pairs of rounds 1 and 2 (round 0's fit has only its own pairs).
    def pull(name: str) -> float:
        judged = [j for r in (1, 2) for j in read_jsonl(tmp_path / name / "rounds" / f"{r:06d}" / "judgments.jsonl")
                  if j["p_a"] is not None and j["lengths"][0] != j["lengths"][1]]
        return sum((j["p_a"] - 0.5) * (1 if j["lengths"][0] > j["lengths"][1] else -1) for j in judged) / len(judged)
    # Measured 0.30 and 0.11: the judge's length term is in characters, the fit's in tokens.
    assert pull("plain") > 0.25 and abs(pull("debiased")) < 0.5 * pull("plain"), (pull("plain"), pull("debiased"))

    # A resumed run's window is the run's judgments so far: the same fit as the run's last round.
    stage = AnnotateStage(cfg.annotate, python=verbose_judge)
    stage.open(cfg, run_dir)
    assert stage.debias.effect == pytest.approx(debiased[-1]["judge/length_effect"], rel=1e-9)
    stage.close()
