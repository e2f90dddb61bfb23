"""A round's annotate stage: each prompt's samples judged in both orders, the kept pairs and
the stage's metrics. With annotate.reload_constitution an edited constitution is taken up
before the round is judged; with annotate.canary the canary pairs are judged after the round's.
"""

from __future__ import annotations

from pathlib import Path

from oaif.annotate.base import Annotator, close_annotator
from oaif.annotate.judge import Judged, injection_attempts, judge_health, judgment_metrics, spend_metrics
from oaif.annotate.ranking import Ranking, rank_groups
from oaif.annotate.backends import build_annotator, reload_constitutions
from oaif.annotate.files import load_canary
from oaif.annotate.length import LengthDebias, length_point
from oaif.config import AnnotateConfig, RunConfig, RunStopped
from oaif.records import Sample, read_jsonl


def answers(judgment: dict) -> tuple[float | None, float | None]:
    """A recorded judgment's raw P(first better) with a first, then with b first."""
    by_first = {o["first"]: o["p_first"] for o in judgment["orders"]}
    return by_first.get("a"), by_first.get("b")


class TooManyInvalid(RunStopped):
    """annotate.max_invalid_rate: a round's judgments were mostly invalid (see too_many_invalid)."""


class AnnotateStage:
    """python: the user's own judge (a function or annotator object) in place of the config's;
    the annotator is built by open()."""

    def __init__(self, cfg: AnnotateConfig, python=None):
        self.cfg, self.python = cfg, python
        self.annotator: Annotator | None = None
        self.totals: dict = {}                      # annotator.stats at the end of the last call
        self.refused: dict[Path, set[str]] = {}     # constitution versions refused by a reload
        self.canary = load_canary(cfg)              # None: annotate.canary is off (a bad file fails now)
        self.debias = LengthDebias(cfg.length_debias_window) if cfg.length_debias_window else None

    def open(self, cfg: RunConfig, run_dir: Path | None = None) -> None:
        """run_dir: a resumed run's, whose judgments refill the length debias's window."""
        self.annotator = build_annotator(cfg, self.python)
        if self.debias is not None and run_dir is not None:
            self.debias.observe([point for f in sorted(run_dir.glob("rounds/*/judgments.jsonl")) for j in read_jsonl(f)
                                 if (point := length_point(*answers(j), j.get("lengths", []))) is not None])

    def reload(self) -> list[str]:
        """annotate.reload_constitution: what changed, for the log."""
        return reload_constitutions(self.annotator, self.cfg, self.refused) if self.cfg.reload_constitution else []

    def __call__(self, groups: list[list[Sample]], index: int, policy_version: int
                 ) -> tuple[Judged, list[Ranking], dict]:
        """(the judgments and kept pairs, annotate.ranking's per-prompt rankings, the metrics).
        policy_version: the policy the round's records name when a group is empty."""
        a = self.cfg
        # Records name the policy that drew the samples (with async_rounds, one update before now).
        drawn_by = groups[0][0].policy_version if groups else policy_version
        judged, rankings = rank_groups(self.annotator, groups, a.ranking, a.pairs, index, drawn_by,
                                       a.missing_eos_penalty, self.debias)
        # Candidate pairs: every comparison, or one per prompt (best against worst).
        candidates = len(judged.judgments) if a.ranking == "consecutive" or a.pairs == "all" else len(groups)
        canary = self.canary.check(self.annotator) if self.canary and self.canary.due(index) else {}
        totals, texts = dict(self.annotator.stats), [s.text for g in groups for s in g]
        spent = {k: v - self.totals.get(k, 0) for k, v in totals.items()}   # this call's share
        metrics = {"pairs_kept": len(judged.pairs), "pairs_dropped": candidates - len(judged.pairs),
                   "annotate/comparisons": len(judged.judgments), **judgment_metrics(judged.judgments),
                   "annotate/injection_attempts": (markers := injection_attempts(self.annotator, texts)),
                   "annotate/injection_rate": markers / len(texts) if texts else None,
                   **{f"annotate/{k}": v for k, v in spent.items()},
                   **judge_health(judged.judgments), **spend_metrics(spent, len(judged.pairs)), **canary,
                   **({"judge/length_effect": self.debias.effect} if self.debias else {})}
        self.totals = totals   # the next call counts from here: the metrics are this call's share
        return judged, rankings, metrics

    def too_many_invalid(self, metrics: dict, index: int, run_dir: Path) -> str | None:
        """annotate.max_invalid_rate: why round `index` must not be trained on, or None."""
        invalid, ceiling = metrics.get("annotate/invalid_rate"), self.cfg.max_invalid_rate
        if invalid is None or invalid <= ceiling:
            return None
        return (f"round {index}: {invalid:.0%} of the judged pairs got an invalid judgment (> annotate.max_invalid_rate "
                f"{ceiling:g}), so the round was not trained on; the judge's raw answers are in "
                f"{run_dir / 'rounds' / f'{index:06d}' / 'judgments.jsonl'}")

    def close(self) -> None:
        if self.annotator is not None:
            close_annotator(self.annotator)
            self.annotator = None
