"""A round's annotate stage: each prompt's samples judged in both orders, the kept pairs and
the stage's metrics. With annotate.ranking consecutive the comparisons are chosen by
annotate.select (a proxy's scores, within annotate.budget; annotate/select.py), else ranked
(annotate/ranking.py). With annotate.reload_constitution an edited constitution is taken up
before the round is judged; with annotate.canary the canary pairs are judged after the round's.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from oaif.annotate import budget
from oaif.annotate.base import Annotator, close_annotator
from oaif.annotate.judge import (Judged, injection_attempts, judge_health, judge_pairs, judgment_metrics,
                                 spend_metrics)
from oaif.annotate.proxy import Proxy, ProxyRows
from oaif.annotate.ranking import Ranking, rank_groups
from oaif.annotate.select import RULES, choose
from oaif.annotate.backends import build_annotator, reload_constitutions
from oaif.annotate.files import load_canary
from oaif.annotate.length import LengthDebias, length_point
from oaif.config import AnnotateConfig, RunConfig, RunStopped
from oaif.records import Sample, read_jsonl


def answers(judgment: dict) -> tuple[float | None, float | None]:
    """A recorded judgment's raw P(first better) with a first, then with b first."""
    by_first = {o["first"]: o["p_first"] for o in judgment["orders"]}
    return by_first.get("a"), by_first.get("b")


def stacked(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """The rows as one (N, width) tensor, also when there are none."""
    return torch.stack(rows) if rows else torch.zeros(0, width)


class TooManyInvalid(RunStopped):
    """annotate.max_invalid_rate: a round's judgments were mostly invalid (see too_many_invalid)."""


class AnnotateStage:
    """python: the user's own judge (a function or annotator object) in place of the config's;
    the annotator is built by open()."""

    def __init__(self, cfg: AnnotateConfig, python=None, seed: int = 0):
        self.cfg, self.python, self.seed = cfg, python, seed
        self.annotator: Annotator | None = None
        self.totals: dict = {}                      # annotator.stats at the end of the last call
        self.refused: dict[Path, set[str]] = {}     # constitution versions refused by a reload
        self.canary = load_canary(cfg)              # None: annotate.canary is off (a bad file fails now)
        self.debias = LengthDebias(cfg.length_debias_window) if cfg.length_debias_window else None
        self.rule = RULES[cfg.select.rule]
        self.proxy = Proxy(cfg.select, seed) if self.rule.needs_proxy else None
        self.proxy_rows: ProxyRows | None = None   # the last call's judged pairs, for rounds/N/proxy.pt
        self.spent: dict = {}   # budget/*: the run's judge spend so far, as in its last metrics line

    def open(self, cfg: RunConfig, run_dir: Path | None = None) -> None:
        """run_dir: a resumed run's, whose judgments refill the length debias's window, whose
        proxy.pt files refill the proxy's and whose last metrics line says what was spent."""
        self.annotator = build_annotator(cfg, self.python)
        if run_dir is not None:
            rows = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
            self.spent = {k: v for k, v in (rows[-1] if rows else {}).items() if k in budget.TOTALS}
            if self.proxy is not None:
                self.proxy.refill(run_dir)
        if self.debias is not None and run_dir is not None:
            self.debias.observe([point for f in sorted(run_dir.glob("rounds/*/judgments.jsonl")) for j in read_jsonl(f)
                                 if (point := length_point(*answers(j), j.get("lengths", []))) is not None])

    def reload(self) -> list[str]:
        """annotate.reload_constitution: what changed, for the log."""
        return reload_constitutions(self.annotator, self.cfg, self.refused) if self.cfg.reload_constitution else []

    def __call__(self, groups: list[list[Sample]], index: int, policy_version: int,
                 features: list[torch.Tensor] | None = None) -> tuple[Judged, list[Ranking], dict]:
        """(the judgments and kept pairs, annotate.ranking's per-prompt rankings, the metrics).
        policy_version: the policy the round's records name when a group is empty. features:
        each group's responses' (oaif/policy_features.py), for a select rule's proxy."""
        a = self.cfg
        # Records name the policy that drew the samples (with async_rounds, one update before now).
        drawn_by = groups[0][0].policy_version if groups else policy_version
        if a.ranking == "consecutive":
            (judged, selected), rankings = self._select(groups, index, drawn_by, features), []
        else:
            judged, rankings = rank_groups(self.annotator, groups, a.ranking, a.pairs, index, drawn_by,
                                           a.missing_eos_penalty, self.debias, a.min_label_mass)
            selected = {}
        # Candidate pairs: every comparison, or one per prompt (best against worst).
        candidates = len(judged.judgments) if a.ranking == "consecutive" or a.pairs == "all" else len(groups)
        canary = self.canary.check(self.annotator) if self.canary and self.canary.due(index) else {}
        totals, texts = dict(self.annotator.stats), [s.text for g in groups for s in g]
        spent = {k: v - self.totals.get(k, 0) for k, v in totals.items()}   # this call's share
        # Judge calls: both orders of each comparison sent, less those the cache answered.
        spent["judge_calls"] = 2 * sum(j.verdict != "identical" for j in judged.judgments)
        self.spent |= budget.totals(self.spent, spent)
        metrics = {"pairs_kept": len(judged.pairs), "pairs_dropped": candidates - len(judged.pairs),
                   "annotate/comparisons": len(judged.judgments), **judgment_metrics(judged.judgments),
                   "annotate/injection_attempts": (markers := injection_attempts(self.annotator, texts)),
                   "annotate/injection_rate": markers / len(texts) if texts else None,
                   **{f"annotate/{k}": v for k, v in spent.items()},
                   **judge_health(judged.judgments), **spend_metrics(spent, len(judged.pairs)), **canary,
                   **({"judge/length_effect": self.debias.effect} if self.debias else {}), **selected, **self.spent}
        self.totals = totals   # the next call counts from here: the metrics are this call's share
        return judged, rankings, metrics

    def _select(self, groups: list[list[Sample]], index: int, drawn_by: int, features: list[torch.Tensor] | None
                ) -> tuple[Judged, dict]:
        """annotate.select: (the judged comparisons, select/* metrics). The proxy, refit on the
        verdicts so far, scores the responses; the rule picks the comparisons the round's budget
        pays for; the judge answers them; the proxy is scored on the agreeing verdicts, then
        learns them (proxy_rows: this round's, for rounds/N/proxy.pt)."""
        a, proxy = self.cfg, self.proxy
        if proxy is not None:
            proxy.fit(index)
            rewards = [proxy.rewards(f) for f in features]
        else:
            rewards = [torch.zeros(1, len(g)) for g in groups]
        rng = random.Random(f"{self.seed}:{index}")   # sea's Thompson draws: the same on a resume
        keys = choose(groups, rewards, self.rule, a.select.comparisons_per_prompt,
                      budget.allowance(a.budget, self.spent), rng)
        judged = judge_pairs(self.annotator, [(groups[k][i], groups[k][j]) for k, i, j in keys], index, drawn_by,
                             a.missing_eos_penalty, self.debias, a.min_label_mass)
        if proxy is None:
            return judged, {}
        kept = [(k, i, j, judgment.p_a) for (k, i, j), judgment in zip(keys, judged.judgments)
                if judgment.verdict in ("a", "b")]
        width = features[0].shape[1] if features else 0
        self.proxy_rows = {"a": stacked([features[k][i] for k, i, _, _ in kept], width),
                           "b": stacked([features[k][j] for k, _, j, _ in kept], width),
                           "p_a": torch.tensor([p for *_, p in kept], dtype=torch.float32)}
        metrics = {"select/proxy_accuracy": proxy.accuracy(self.proxy_rows),
                   "select/proxy_pairs": 0 if proxy.rows is None else len(proxy.rows["p_a"])}
        proxy.observe(self.proxy_rows)
        return judged, metrics

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
