"""The cheap stand-in for the judge that annotate.select asks which comparisons to buy.

An ensemble of `heads` linear Bradley-Terry reward models over a response's features (the
policy's pooled hidden states, oaif/policy_features.py): P(a better than b) =
σ(h·(f_a − f_b)). Each head is fit on its own bootstrap resample (Poisson(1) weights) of the
judged pairs, so where the judge's verdicts leave the reward open the heads disagree (oat's
ensemble reward model). Targets are the judge's soft labels (both orders' mean P(a better)) of
the comparisons whose orders agreed, the most recent `window` of them.

Every round it is refit from zero on the window with a generator seeded by (run seed,
round): its state is a function of the judged pairs alone, which the run directory keeps
(rounds/N/proxy.pt, the features each verdict was given on), so a resumed run refits the
same proxy as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from oaif.config import SelectConfig

ProxyRows = dict[str, torch.Tensor]   # a: (N, d), b: (N, d), p_a: (N,): judged pairs' features and soft labels


class Proxy:
    def __init__(self, cfg: SelectConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.rows: ProxyRows | None = None   # the window
        self.heads: torch.Tensor | None = None   # (heads, d), on standardised features; None: not fit
        self.scale: torch.Tensor | None = None   # (d,) the features' spread in the window

    def observe(self, rows: ProxyRows) -> None:
        """Add judged pairs to the window, dropping the oldest beyond annotate.select.window."""
        if self.rows is not None:
            rows = {k: torch.cat([self.rows[k], v]) for k, v in rows.items()}
        self.rows = {k: v[-self.cfg.window:] for k, v in rows.items()}

    def refill(self, run_dir: Path) -> None:
        """A resumed run's window, from the rounds its checkpoint kept (the later ones are gone)."""
        for path in sorted(run_dir.glob("rounds/*/proxy.pt")):
            self.observe(torch.load(path, weights_only=True))

    def fit(self, round: int) -> None:
        """Every head from zero on the window (full batch, Adam), each on its own bootstrap weights,
        on one thread: matrices this small ran ~50x slower on two here (OpenMP waiting), and
        the fit is then the same whatever the process's thread count."""
        if self.rows is None or not len(self.rows["p_a"]):
            return   # no agreeing verdict yet: every head stays at 0
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._fit(round)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, round: int) -> None:
        c = self.cfg
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + round)
        a, b, p = self.rows["a"], self.rows["b"], self.rows["p_a"]
        # Standardised by spread alone: a reward difference does not see the mean.
        self.scale = torch.cat([a, b]).std(0, unbiased=False).clamp(min=1e-4)
        gaps = (a - b) / self.scale
        weights = torch.poisson(torch.ones(c.heads, len(p)), generator=g)   # (heads, N)
        heads = torch.zeros(c.heads, gaps.shape[1], requires_grad=True)
        optimizer = torch.optim.Adam([heads], lr=c.learning_rate)
        for _ in range(c.steps):
            logits = heads @ gaps.T   # (heads, N)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, p.expand_as(logits), reduction="none")
            loss = (weights * loss).sum(1) / weights.sum(1).clamp(min=1) + c.l2 * heads.pow(2).sum(1)
            optimizer.zero_grad()
            loss.sum().backward()
            optimizer.step()
        self.heads = heads.detach()

    def rewards(self, features: torch.Tensor) -> torch.Tensor:
        """(heads, n) rewards of n responses' features; all 0 before the first fit."""
        if self.heads is None:
            return torch.zeros(self.cfg.heads, len(features))
        return self.heads @ (features / self.scale).T

    def accuracy(self, rows: ProxyRows) -> float | None:
        """The share of judged pairs whose winner the heads' mean reward picks (None: not fit, or
        no pair); read on a round's verdicts before the proxy learns from them."""
        if self.heads is None or not len(rows["p_a"]):
            return None
        gap = (self.rewards(rows["a"]) - self.rewards(rows["b"])).mean(0)
        return ((gap > 0) == (rows["p_a"] > 0.5)).float().mean().item()
