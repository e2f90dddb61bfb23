"""Reward-hacking alarms (oaif/alarms.py): each check on metric rows as a run writes them, and
the length alarm in a real run: the concise rule alone (the demo's config) shortens the tiny
policy's answers past 2x; with alarms.action=stop the run ends before that round is trained
on, with the last round's checkpoint, and resumes from it."""

import pytest

from oaif.alarms import tripped
from oaif.config import AlarmsConfig
from oaif.records import read_jsonl

from conftest import oaif_main


def rows(key: str, values: list) -> list[dict]:
    return [{"round": k, key: v} for k, v in enumerate(values)]


@pytest.mark.parametrize("key, values, cfg, alarm", [
    ("generate/mean_length", [30.0, 20.0, 14.0], AlarmsConfig(), "length"),            # under 30 / 2
    ("generate/mean_length", [30.0, 40.0, 61.0], AlarmsConfig(), "length"),            # over 30 * 2
    ("annotate/injection_rate", [0.0, 0.0, 0.1], AlarmsConfig(), "markers"),
    ("judge/canary_accuracy", [0.9, 0.9, 0.6], AlarmsConfig(), "canary"),
    ("train/kl_to_ref", [0.5, 9.0, 10.5], AlarmsConfig(), "kl"),                        # over kl_max 10
])
def test_each_alarm_trips_past_its_bound_and_not_before(key, values, cfg, alarm):
    *history, now = rows(key, values)
    index = now.pop("round")
    trips = tripped(cfg, index, now, history)
    assert [t.alarm for t in trips] == [alarm] and trips[0].round == index and trips[0].metric == key
    assert tripped(cfg, index - 1, history[-1], history[:-1]) == []          # the round before: inside
    assert tripped(AlarmsConfig(action="off"), index, now, history) == []


@pytest.mark.parametrize("prefix", ["eval/", "eval/live_"])
def test_the_judge_gap_trips_when_the_training_judge_likes_the_policy_more_than_the_independent_one(prefix):
    def row(ours, theirs):
        return {f"{prefix}train_judge_win_rate": ours, f"{prefix}{'win_rate_vs_ref' if prefix == 'eval/' else 'win_rate'}": theirs}
    assert tripped(AlarmsConfig(), 3, row(0.75, 0.6), []) == []                      # a gap of 0.15: inside
    assert tripped(AlarmsConfig(), 3, row(0.4, 0.75), []) == []                      # the independent judge likes it more
    [trip] = tripped(AlarmsConfig(), 3, row(0.85, 0.6), [])
    assert (trip.alarm, trip.metric, trip.value) == ("judge_gap", f"{prefix}train_judge_win_rate", 0.85)
    assert tripped(AlarmsConfig(judge_gap=0), 3, row(0.85, 0.6), []) == []


def test_the_judge_gap_stops_a_run_whose_judges_disagree_with_that_rounds_checkpoint(tiny_model, tmp_path):
    """Trained on the concise rule, judged independently by the detailed one: the training
    judge's win rate rises as the independent one's falls, read after the round is trained;
    stop ends the run with that round written and checkpointed, and names the one before."""
    args = ["configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=gap", "rounds=8",
            "eval.every=2", "eval.prompts=prompts/heldout.jsonl", "eval.max_prompts=40",
            "eval.annotate={backend: rules, constitution: detailed}", "alarms.length_ratio=0",
            "train.checkpoint_every=1", "alarms.action=stop"]
    r = oaif_main("run", *args)
    assert r.returncode == 2, r.stderr[-3000:]
    run = tmp_path / "gap"
    metrics = read_jsonl(run / "metrics.jsonl")
    last = metrics[-1]   # the round that tripped it: trained, evaluated, written
    tripped_at = last["round"]
    assert last["alarms/judge_gap"] == 1 and not any("alarms/judge_gap" in m for m in metrics[:-1])
    assert last["eval/train_judge_win_rate"] - last["eval/win_rate_vs_ref"] > 0.2
    assert all(m["eval/train_judge_win_rate"] - m["eval/win_rate_vs_ref"] <= 0.2 for m in metrics[:-1]
               if "eval/win_rate_vs_ref" in m)
    [trip] = read_jsonl(run / "rounds" / f"{tripped_at:06d}" / "alarms.jsonl")
    assert trip["alarm"] == "judge_gap" and trip["value"] == last["eval/train_judge_win_rate"]
    # Each evaluated pair carries both judges' outcomes.
    records = read_jsonl(run / "eval" / f"round_{tripped_at:06d}.jsonl")
    assert {r["train_judge_outcome"] for r in records} <= {"win", "tie", "loss"} and len(records) == 40
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"oaif: error: alarm judge_gap in round {tripped_at}: eval/train_judge_win_rate")
    assert f"Round {tripped_at} is trained and its checkpoint written" in line
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints[-1] == f"round_{tripped_at:06d}"
    if tripped_at > 0:
        before = run / "checkpoints" / f"round_{tripped_at - 1:06d}"
        assert f"--checkpoint {before}` goes on from the last one before it" in line
    r = oaif_main("report", str(run))   # the hacking panel draws both judges
    assert r.returncode == 0, r.stderr[-2000:]
    page = (run / "report/report.html").read_text()
    assert "<h2>Hacking</h2>" in page and f"alarm judge_gap in round {tripped_at}" in page
    assert (run / "report/hacking.png").is_file()


def test_the_length_alarm_ends_a_concise_run_before_the_round_that_tripped_it(tiny_model, tmp_path):
    args = ["configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=alarm",
            "rounds=12", "train.checkpoint_every=0"]
    r = oaif_main("run", *args, "alarms.action=stop")
    assert r.returncode == 2, r.stderr[-3000:]
    run = tmp_path / "alarm"
    metrics = read_jsonl(run / "metrics.jsonl")
    tripped_at = len(metrics)   # the round that tripped it has no metrics line: it was not trained on
    first, last = metrics[0]["generate/mean_length"], metrics[-1]["generate/mean_length"]
    assert 1 <= tripped_at < 12 and first / 2 <= last <= first * 2
    [trip] = read_jsonl(run / "rounds" / f"{tripped_at:06d}" / "alarms.jsonl")
    assert trip["alarm"] == "length" and trip["value"] < first / 2 and trip["since"] == 0
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"oaif: error: alarm length in round {tripped_at}: generate/mean_length") and \
        f"Checkpoint after round {tripped_at - 1} is written" in line
    assert f"alarm length in round {tripped_at}" in r.stdout
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"round_{tripped_at - 1:06d}"]
    r = oaif_main("report", str(run))   # the report marks it
    assert r.returncode == 0, r.stderr[-2000:]
    page = (run / "report/report.html").read_text()
    assert "<h2>Alarms</h2>" in page and f"alarm length in round {tripped_at}: generate/mean_length" in page
    # Warned instead of stopped, the same run goes on and records every round that trips it;
    # a KL bound it passes every round adds an alarm read after training to the same rounds.
    r = oaif_main("run", *args, "name=warned", "alarms.kl_max=0.001")
    assert r.returncode == 0, r.stderr[-3000:]
    warned = read_jsonl(tmp_path / "warned/metrics.jsonl")
    assert warned[tripped_at].get("alarms/length") == 1 and "alarms/length" not in warned[tripped_at - 1]
    assert warned[tripped_at].get("alarms/kl") == 1
    trips = read_jsonl(tmp_path / "warned" / "rounds" / f"{tripped_at:06d}" / "alarms.jsonl")
    assert [t["alarm"] for t in trips] == ["length", "kl"]
