"""Reward-hacking alarms (`alarms.*`): signs, read off each round's metrics before the round
is trained on, that the policy has started to game its judge or the judge has gone wrong.

    length   the round's mean response length left [first / r, first * r] (first: the run's
             first round; r: alarms.length_ratio): a length rule, or a judge with a length
             bias, is being exploited.
    markers  more than alarms.marker_rate of the round's responses carry judge markers
             (annotate/injection_attempts): the policy is learning to write to its judge.
    canary   judge/canary_accuracy fell more than alarms.canary_drop below the run's first
             canary check: the judge itself changed (constitution, model, template).
  and, read once the round is trained (and evaluated, when due):
    kl       train/kl_to_ref, the KL to the start along the round's responses, past
             alarms.kl_max: the policy has moved far from where it started.
    judge_gap  the training judge's win rate against the start exceeds the independent
             judge's (eval.annotate) by more than alarms.judge_gap, on the same held-out
             answers (full or live evaluation): what the policy learned pleases the judge it
             trained on and not the other one.

`warn` records every trip (the round's alarms.jsonl, alarms/* in metrics.jsonl) and prints a
line the first time an alarm trips in a run. `stop` ends the run: an alarm read before
training ends it before the round is trained on, with the last round's checkpoint; one read
after training ends it with that round's checkpoint (the policy that tripped it, kept to be
read), and a resume from the checkpoint before it goes on from the policy that had not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from oaif.config import AlarmsConfig, RunStopped


@dataclass(frozen=True)
class Trip:
    """One alarm tripped in `round`: `metric` is `value`, past `bound` (set from `since`'s value)."""
    alarm: str
    round: int
    metric: str
    value: float
    bound: str
    since: int

    def line(self) -> str:
        return f"alarm {self.alarm} in round {self.round}: {self.metric} {self.value:.3g}, past {self.bound}"

    def record(self) -> dict:
        return asdict(self)


class AlarmStop(RunStopped):
    """An alarm set to stop the run tripped."""


def first_value(history: list[dict], metrics: dict, key: str) -> tuple[int, float] | None:
    """(round, value) of the run's first round that has `key`: the rounds written so far, or this one."""
    for row in [*history, metrics]:
        if row.get(key) is not None:
            return row["round"] if "round" in row else len(history), row[key]
    return None


def length_trip(cfg: AlarmsConfig, index: int, metrics: dict, history: list[dict]) -> Trip | None:
    now, first = metrics.get("generate/mean_length"), first_value(history, metrics, "generate/mean_length")
    if not cfg.length_ratio or now is None or first is None or first[0] == index or not first[1]:
        return None
    low, high = first[1] / cfg.length_ratio, first[1] * cfg.length_ratio
    if low <= now <= high:
        return None
    return Trip("length", index, "generate/mean_length", now, f"{low:.3g}-{high:.3g} (alarms.length_ratio "
                f"{cfg.length_ratio:g} around round {first[0]}'s {first[1]:.3g})", first[0])


def markers_trip(cfg: AlarmsConfig, index: int, metrics: dict, history: list[dict]) -> Trip | None:
    rate = metrics.get("annotate/injection_rate")
    if not cfg.marker_rate or rate is None or rate <= cfg.marker_rate:
        return None
    return Trip("markers", index, "annotate/injection_rate", rate, f"alarms.marker_rate {cfg.marker_rate:g}", index)


def canary_trip(cfg: AlarmsConfig, index: int, metrics: dict, history: list[dict]) -> Trip | None:
    now, first = metrics.get("judge/canary_accuracy"), first_value(history, metrics, "judge/canary_accuracy")
    if not cfg.canary_drop or now is None or first is None or now >= first[1] - cfg.canary_drop:
        return None
    return Trip("canary", index, "judge/canary_accuracy", now,
                f"{first[1] - cfg.canary_drop:.3g} (alarms.canary_drop {cfg.canary_drop:g} below round {first[0]}'s "
                f"{first[1]:.3g})",
                first[0])


def kl_trip(cfg: AlarmsConfig, index: int, metrics: dict, history: list[dict]) -> Trip | None:
    kl = metrics.get("train/kl_to_ref")
    if not cfg.kl_max or kl is None or kl <= cfg.kl_max:
        return None
    return Trip("kl", index, "train/kl_to_ref", kl, f"alarms.kl_max {cfg.kl_max:g}", index)


# The win rates the judge gap compares: (training judge's, independent judge's), per evaluation kind.
GAPS = (("eval/train_judge_win_rate", "eval/win_rate_vs_ref"),
        ("eval/live_train_judge_win_rate", "eval/live_win_rate"))


def judge_gap_trip(cfg: AlarmsConfig, index: int, metrics: dict, history: list[dict]) -> Trip | None:
    for training, independent in GAPS:
        ours, theirs = metrics.get(training), metrics.get(independent)
        if cfg.judge_gap and ours is not None and theirs is not None and ours - theirs > cfg.judge_gap:
            return Trip("judge_gap", index, training, ours, f"{independent} {theirs:.3g} + alarms.judge_gap "
                        f"{cfg.judge_gap:g}", index)
    return None


BEFORE_TRAINING = (length_trip, markers_trip, canary_trip)
AFTER_TRAINING = (kl_trip, judge_gap_trip)


def tripped(cfg: AlarmsConfig, index: int, metrics: dict, history: list[dict],
            checks=BEFORE_TRAINING + AFTER_TRAINING) -> list[Trip]:
    """The alarms round `index`'s metrics trip (none when alarms.action is off); history: the
    metrics.jsonl rows of the rounds before it."""
    if cfg.action == "off":
        return []
    return [t for check in checks if (t := check(cfg, index, metrics, history)) is not None]
