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
])
def test_each_alarm_trips_past_its_bound_and_not_before(key, values, cfg, alarm):
    *history, now = rows(key, values)
    index = now.pop("round")
    trips = tripped(cfg, index, now, history)
    assert [t.alarm for t in trips] == [alarm] and trips[0].round == index and trips[0].metric == key
    assert tripped(cfg, index - 1, history[-1], history[:-1]) == []          # the round before: inside
    assert tripped(AlarmsConfig(action="off"), index, now, history) == []


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
    # Warned instead of stopped, the same run goes on and records every round that trips it.
    r = oaif_main("run", *args, "name=warned")
    assert r.returncode == 0, r.stderr[-3000:]
    warned = read_jsonl(tmp_path / "warned/metrics.jsonl")
    assert warned[tripped_at].get("alarms/length") == 1 and "alarms/length" not in warned[tripped_at - 1]
