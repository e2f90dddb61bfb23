"""annotate.budget: what a run may spend on its judge, and what it has spent.

A judge call is one order of one comparison the round asks for: a comparison costs 2 and two
identical responses cost nothing (never sent). An answer the judgment cache holds counts as a
call too, so that a run spends its budget at the same rounds however often it is resumed or
repeated (a round redone after a crash finds its answers in the cache). Canary checks
(annotate.canary) are not the selection's to spend and are not counted. API judges' billed
tokens and money are counted as their backend reports them (annotate/api_tokens,
annotate/api_cost): there, a cached answer costs nothing. The run's totals go in every metrics line (budget/*), so a resumed run
picks them up from the last line its checkpoint kept, and every process of a launch reads
the same decision from the same line.
"""

from __future__ import annotations

from oaif.config import BudgetConfig

# The run's totals in each metrics line: metric name -> the annotator stat it adds up.
TOTALS = {"budget/judge_calls": "judge_calls", "budget/api_tokens": "api_tokens", "budget/api_cost": "api_cost"}


def allowance(cfg: BudgetConfig, spent: dict) -> int | None:
    """The judge calls this round may spend (None: no cap). spent: the last metrics line."""
    caps = [cfg.calls_per_round] if cfg.calls_per_round else []
    if cfg.calls_total:
        caps.append(max(0, cfg.calls_total - spent.get("budget/judge_calls", 0)))
    return min(caps) if caps else None


def totals(spent_before: dict, round_spend: dict) -> dict:
    """The run's budget/* totals after a round: the last line's plus this round's spend
    (judge_calls, and the API's api_tokens / api_cost where the judge bills them)."""
    return {name: spent_before.get(name, 0) + round_spend[stat] for name, stat in TOTALS.items() if stat in round_spend}


def spent_out(cfg: BudgetConfig, metrics: dict) -> tuple[str, str] | None:
    """(the annotate.budget key, what was spent) when the run must end after the round whose
    metrics line this is; None: it goes on."""
    calls, tokens, cost = (metrics.get(k, 0) for k in TOTALS)
    if cfg.calls_total and cfg.calls_total - calls < 2:
        return "annotate.budget.calls_total", f"{calls} of {cfg.calls_total} judge calls spent"
    if cfg.tokens_total and tokens >= cfg.tokens_total:
        return "annotate.budget.tokens_total", f"{tokens} of {cfg.tokens_total} API tokens spent"
    if cfg.cost_total and cost >= cfg.cost_total:
        return "annotate.budget.cost_total", f"{cost:.4g} of {cfg.cost_total:g} spent"
    return None
