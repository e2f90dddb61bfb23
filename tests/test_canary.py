"""Canary pairs (annotate.canary): labelled pairs re-judged every N rounds by the run's own
annotator, past its judgment cache, so that a judge that breaks (an edited constitution, a
swapped model, a broken template) shows in judge/canary_accuracy at once."""

import json

import pytest

import oaif
from oaif.annotate.backends import build_annotator
from oaif.annotate.cache import CachedAnnotator, uncached
from oaif.annotate.mix import MixAnnotator
from oaif.annotate.files import annotate_pairs, judge_rows, load_canary
from oaif.annotate.stage import AnnotateStage
from oaif.bundled import DATA
from oaif.config import ConfigError, load_config
from oaif.constitution import load_constitution
from oaif.records import Sample, read_jsonl

from conftest import ROOT, oaif_main

CANARIES = sorted((DATA / "canaries").glob("*.jsonl"))


def broken_concise(folder):
    """The concise constitution with its one rule inverted (an edit that breaks the rules judge),
    under the same name: the bundled concise canaries still apply to it."""
    path = folder / "concise.yaml"
    path.write_text((DATA / "constitutions/concise.yaml").read_text().replace("check: shorter", "check: longer"))
    return path


def rules_config(*overrides):
    return load_config(ROOT / "configs/tiny_cpu.yaml", ["annotate.canary.every=1", *overrides])


@pytest.mark.parametrize("path", CANARIES, ids=lambda p: p.stem)
def test_every_bundled_canary_set_is_labelled_by_its_constitutions_own_rules(path):
    """Each set belongs to a bundled constitution; its labels are clear-cut, on both sides (a judge
    that always picks one position scores half), and where the constitution has rules, its rules
    judge gets every pair right."""
    rows = read_jsonl(path)
    constitution = load_constitution(path.stem)
    assert 8 <= len(rows) <= 20 and constitution.name == path.stem
    labels = [row["correct"] for row in rows]
    assert set(labels) == {"a", "b"} and abs(labels.count("a") - labels.count("b")) <= 1
    if constitution.rules:
        cfg = rules_config(f"annotate.constitution={path.stem}")
        assert load_canary(cfg.annotate).check(build_annotator(cfg)) == \
            {"judge/canary_accuracy": 1.0, "judge/canary_change": 0.0}


def test_every_bundled_constitution_has_a_canary_set():
    assert [p.stem for p in CANARIES] == sorted(p.stem for p in (DATA / "constitutions").glob("*.yaml"))


def test_a_canary_reaches_the_judge_every_time_though_the_cache_holds_its_answer(tmp_path):
    asked = []

    def shorter(prompt, first, second):   # a Python judge that counts what it is asked
        asked.append((first, second))
        return 1.0 if len(first) < len(second) else 0.0

    cfg = rules_config("annotate.backend=python", "annotate.python=x:y", "annotate.python_cache=true",
                       f"annotate.cache={tmp_path / 'cache.jsonl'}")
    annotator = build_annotator(cfg, shorter)
    canary = load_canary(cfg.annotate)
    judge_rows(annotator, canary.rows)   # through the cache: it now holds every canary answer
    assert len(asked) == 2 * len(canary.rows)
    judge_rows(annotator, canary.rows)
    assert len(asked) == 2 * len(canary.rows), "the cache answers a second ask"
    for check in (1, 2):
        assert canary.check(annotator)["judge/canary_accuracy"] == 1.0
        assert len(asked) == 2 * len(canary.rows) * (1 + check), "a canary check was answered from the cache"
    # A mix's members are unwrapped too (each may have its own cache).
    rules = build_annotator(rules_config())
    assert isinstance(annotator, CachedAnnotator)
    assert [m for m, _ in uncached(MixAnnotator([(annotator, 1.0), (rules, 1.0)])).members] == [annotator.inner, rules]


def test_the_annotate_stage_judges_the_canaries_on_the_rounds_due_and_counts_their_requests():
    cfg = rules_config("annotate.canary.every=2")
    stage = AnnotateStage(cfg.annotate)
    stage.open(cfg)
    group = [Sample(round=0, policy_version=0, prompt_id="p", messages=[{"role": "user", "content": "Hi?"}], index=k,
                    text=text, prompt_token_ids=[], token_ids=[], finish_reason="stop") for k, text in
             enumerate(("Hello.", "Hello there, how are you?"))]
    rounds = [stage([group], index, 0)[2] for index in range(3)]
    assert [m.get("judge/canary_accuracy") for m in rounds] == [1.0, None, 1.0]
    assert [m.get("judge/canary_change") for m in rounds] == [0.0, None, 0.0]
    canary_requests = 2 * len(stage.canary.rows)   # the judge's work that round, the canary's included
    assert [m["annotate/requests"] for m in rounds] == [2 + canary_requests, 2, 2 + canary_requests]


def test_canary_change_counts_the_verdicts_that_moved_since_the_first_check(tmp_path):
    cfg = rules_config()
    canary = load_canary(cfg.annotate)
    assert canary.check(build_annotator(cfg))["judge/canary_change"] == 0.0
    broken = rules_config(f"annotate.constitution={broken_concise(tmp_path)}")
    assert canary.check(build_annotator(broken)) == {"judge/canary_accuracy": 0.0, "judge/canary_change": 1.0}


def test_canary_pairs_are_the_constitutions_bundled_set_a_named_set_or_a_file(tmp_path):
    assert load_canary(rules_config().annotate).path == DATA / "canaries/concise.jsonl"
    assert load_canary(rules_config("annotate.constitution=correct").annotate).path == DATA / "canaries/correct.jsonl"
    named = rules_config("annotate.constitution=correct", "annotate.canary.pairs=concise")
    assert load_canary(named.annotate).path == DATA / "canaries/concise.jsonl"
    assert load_canary(rules_config("annotate.canary.every=0").annotate) is None
    # A constitution of yours under a name without a bundled set: no check, unless you give pairs.
    mine = tmp_path / "mine.yaml"
    mine.write_text((DATA / "constitutions/concise.yaml").read_text().replace("name: concise", "name: mine"))
    assert load_canary(rules_config(f"annotate.constitution={mine}").annotate) is None
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi?", "a": "Hello.", "b": "Hello to you too.", "correct": "a"}) + "\n")
    (tmp_path / "config.yaml").write_text("annotate:\n  constitution: mine.yaml\n  canary: {every: 1, pairs: pairs.jsonl}\n")
    own = load_config(tmp_path / "config.yaml")   # relative to the config's folder, as its other paths
    canary = load_canary(own.annotate)
    assert canary.path == pairs and canary.check(build_annotator(own))["judge/canary_accuracy"] == 1.0


def test_bad_canary_settings_and_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"annotate.canary.evry: unknown key \(did you mean 'annotate.canary.every'\?\)"):
        rules_config("annotate.canary.evry=2")
    with pytest.raises(ConfigError, match="annotate.canary.every: must be >= 0"):
        rules_config("annotate.canary.every=-1")
    with pytest.raises(FileNotFoundError, match="no bundled canary pairs named 'nope'"):
        load_canary(rules_config("annotate.canary.pairs=nope").annotate)
    with pytest.raises(FileNotFoundError, match="annotate.canary.pairs: .*missing.jsonl not found"):
        load_canary(rules_config(f"annotate.canary.pairs={tmp_path / 'missing.jsonl'}").annotate)
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text(json.dumps({"prompt": "Hi?", "a": "Hello.", "b": "Hello you."}) + "\n")
    with pytest.raises(ValueError, match=r"unlabelled.jsonl:1: a canary pair needs 'correct'"):
        load_canary(rules_config(f"annotate.canary.pairs={unlabelled}").annotate)


def test_oaif_annotate_reports_accuracy_on_the_canary_file_and_the_canary_check(tmp_path):
    """The shipped constitution gets its canaries right; the broken one gets them all wrong, and
    says so both as the file's accuracy and as the config's canary check."""
    canaries = str(DATA / "canaries/concise.jsonl")
    for constitution, accuracy in (("concise", 1.0), (broken_concise(tmp_path), 0.0)):
        out = tmp_path / f"{accuracy}.jsonl"
        r = oaif_main("annotate", canaries, "--out", str(out), "configs/tiny_cpu.yaml",
                      f"annotate.constitution={constitution}", "annotate.canary.every=1", cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        right = round(accuracy * 10)
        assert f"agrees with the file's 'correct' field on {right}/10 pairs" in r.stdout
        assert f"canary pairs ({canaries}): the judge agrees with {accuracy:.0%} of their labels" in r.stdout
        assert [row["verdict"] == row["correct"] for row in read_jsonl(out)] == [bool(accuracy)] * 10
    _, metrics = annotate_pairs(rules_config(), read_jsonl(canaries)[:2])
    assert metrics["annotate/accuracy"] == metrics["judge/canary_accuracy"] == 1.0


def test_a_broken_constitution_is_flagged_by_canary_accuracy_in_a_short_run(tiny_model, tmp_path):
    """The issue's scenario: the shipped constitution's run scores its canaries high; a copy with
    its rule inverted, given as a path, scores them low from the first round."""
    accuracies = {}
    for name, constitution in (("shipped", "concise"), ("broken", broken_concise(tmp_path))):
        cfg = load_config(ROOT / "configs/tiny_cpu.yaml", [
            f"policy.model={tiny_model}", f"output_dir={tmp_path}", f"name={name}", "rounds=2", "prompts_per_round=4",
            f"annotate.constitution={constitution}", "annotate.canary.every=1"])
        run_dir = oaif.run(cfg, log=lambda *_: None)
        accuracies[name] = [m["judge/canary_accuracy"] for m in read_jsonl(run_dir / "metrics.jsonl")]
    assert accuracies == {"shipped": [1.0, 1.0], "broken": [0.0, 0.0]}


def test_an_edit_that_breaks_the_judge_mid_run_shows_in_the_next_rounds_canary_check(tiny_model, tmp_path):
    """annotate.reload_constitution: the constitution file is edited before round 1; that round's
    canary check (after the reload) drops, and every verdict moved since the first check."""
    constitution = tmp_path / "concise.yaml"
    constitution.write_text((DATA / "constitutions/concise.yaml").read_text())

    class Edit:
        def on_round_start(self, index, loop):
            if index == 1:
                broken_concise(tmp_path)   # rewrites concise.yaml in place

    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", [
        f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=edited", "rounds=2", "prompts_per_round=4",
        f"annotate.constitution={constitution}", "annotate.reload_constitution=true", "annotate.canary.every=1"])
    metrics = read_jsonl(oaif.run(cfg, callbacks=[Edit()], log=lambda *_: None) / "metrics.jsonl")
    assert [(m["judge/canary_accuracy"], m["judge/canary_change"]) for m in metrics] == [(1.0, 0.0), (0.0, 1.0)]
