"""Spending the judge where it teaches (issue 30): the held-out win rate against the start as a
function of judge calls spent, for each way of choosing the comparisons the judge sees.

    .venv/bin/python scripts/experiments/judge_budget.py [--only ARM,ARM] [--seeds 0,1,...] [--out DIR] [key=value ...]

The task, judges and evaluation are the online-vs-offline experiment's
(configs/experiments/online_offline_tiny.yaml; its training annotator, the distilled reward
model, is built into annotate.model when missing, as online_offline.py does). Every arm samples
4 responses per prompt (generate.samples_per_prompt=4) and judges at most
`fraction` × 2 × prompts_per_round judge calls per round (annotate.budget.calls_per_round; a
comparison is 2 calls, both orders): fraction 1 buys one comparison per prompt, OAIF's
amount of feedback; 0.5 half of that. An arm is RULE@FRACTION, RULE one of annotate.select.rule:
  random@1      (0, 1) of every prompt: online DPO as OAIF runs it (the baseline)
  random@F      the same pairs for a share F of the prompts (fewer judge calls, no choosing)
  max_margin@F, uncertain@F, sea@F   the proxy's choice, on the same number of judge calls
with F 0.5 and 0.25. The goal it tests: a rule at 0.5 ends at random@1's win rate (paired by
seed) with half the calls. random@F is the control that goal needs: where random@0.5 also ends
there, the task saturates before the judge budget binds, and only the smaller budget (0.25)
can tell the rules apart.

Each arm stores DIR/arms/ARM.json (every seed's metrics per round, the command, minutes and
CPU); results.md, win_rate.png and table.md are written from every stored arm, so --only
reruns some arms and keeps the rest. Runs go to DIR/runs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # results.py, online_offline.py, beside this file
from online_offline import distil_reward_model, quiet  # noqa: E402
from results import (RESAMPLES, ROOT, Results, check_model, fmt, mean_sd, mean_spread, nested_interval,  # noqa: E402
                     prompt_scores, table, with_interval)

import oaif  # noqa: E402
from oaif.evaluation import eval_annotator_config  # noqa: E402
from oaif.records import read_jsonl  # noqa: E402

ARMS = ("random@1", *(f"{rule}@{f}" for f in ("0.5", "0.25") for rule in ("random", "max_margin", "uncertain", "sea")))
BASELINE = "random@1"
SAMPLES = 4
KEYS = ("round", "budget/judge_calls", "annotate/judge_calls", "pairs_kept", "select/proxy_accuracy",
        "eval/win_rate_vs_ref", "eval/kl_to_ref", "eval/mean_length")


def run_name(arm: str, seed: int | str) -> str:
    return f"{arm.replace('@', '-')}-seed{seed}"


def arm_config(cfg: oaif.RunConfig, arm: str, seed: int, out: Path) -> oaif.RunConfig:
    rule, fraction = arm.split("@")
    a = cfg.annotate
    return dataclasses.replace(
        cfg, seed=seed, name=run_name(arm, seed), overwrite=True, output_dir=str(out / "runs"),
        generate=dataclasses.replace(cfg.generate, samples_per_prompt=SAMPLES),
        annotate=dataclasses.replace(
            a, select=dataclasses.replace(a.select, rule=rule),
            budget=dataclasses.replace(a.budget, calls_per_round=round(float(fraction) * 2 * cfg.prompts_per_round))))


def run_arm(cfg: oaif.RunConfig, arm: str, seeds: list[int], out: Path) -> dict:
    """Every seed's run of one arm: its metrics per round (KEYS) and its minutes."""
    runs, minutes = {}, {}
    for seed in seeds:
        t0 = time.perf_counter()
        run_dir = oaif.run(arm_config(cfg, arm, seed, out), log=quiet)
        minutes[str(seed)] = (time.perf_counter() - t0) / 60
        rows = [{k: m.get(k) for k in KEYS} for m in read_jsonl(run_dir / "metrics.jsonl")]
        last = rows[-1]
        print(f"{arm} seed {seed}: win rate {last['eval/win_rate_vs_ref']:.3f} after {last['budget/judge_calls']} "
              f"judge calls, {minutes[str(seed)]:.1f} min", flush=True)
        runs[str(seed)] = rows
    return {"arm": arm, "seeds": runs, "seed_minutes": minutes}


def round_scores(out: Path, arm: str, seed: str, round: int) -> dict[str, float]:
    """Each held-out prompt's score against the start in one evaluation, from the run's own records."""
    return prompt_scores(read_jsonl(out / "runs" / run_name(arm, seed) / "eval" / f"round_{round:06d}.jsonl"))


def paired(a: list[dict[str, float]], b: list[dict[str, float]]) -> list[list[float]]:
    """a - b per seed (the groups) and prompt (the prompts both have)."""
    return [[x[p] - y[p] for p in x if p in y] for x, y in zip(a, b)]


def same_calls_round(rows: list[dict], calls: int) -> int:
    """The last round by which a run had spent at most `calls` judge calls (round 0 at least)."""
    return max([r["round"] for r in rows if r["budget/judge_calls"] <= calls], default=0)


def curve(out: Path, arm: str, stored: dict) -> tuple:
    """(mean judge calls spent, win rate, 95% low, 95% high) per round, over seeds × prompts."""
    seeds = stored["seeds"]
    rounds = min(map(len, seeds.values()))
    x = [mean_spread([rows[k]["budget/judge_calls"] for rows in seeds.values()])[0] for k in range(rounds)]
    y, low, high = [], [], []
    for k in range(rounds):
        groups = [list(round_scores(out, arm, s, k).values()) for s in seeds]
        values = [v for g in groups for v in g]
        y.append(sum(values) / len(values) if values else None)
        lo, hi = nested_interval(groups, RESAMPLES)
        low.append(lo)
        high.append(hi)
    return x, y, low, high


def write(out: Path, res: Results, cfg: oaif.RunConfig) -> Path:
    """results.md, table.md and win_rate.png from every arm stored in out/arms and its runs' eval records."""
    stored = {p.stem: json.loads(p.read_text()) for p in sorted((out / "arms").glob("*.json"))}
    order = [a for a in ARMS if a in stored] + sorted(a for a in stored if a not in ARMS)
    judge = eval_annotator_config(cfg).annotate
    trained_by = cfg.annotate.model if cfg.annotate.backend == "reward_model" else cfg.annotate.constitution
    res.add(f"Policy `{cfg.policy.model}`, prompts `{cfg.prompts}` ({cfg.rounds} rounds × {cfg.prompts_per_round} "
            f"prompts × {SAMPLES} samples, loss {cfg.train.loss}, lr {cfg.train.learning_rate}); training annotator "
            f"`{cfg.annotate.backend}` (`{trained_by}`); evaluation annotator "
            f"`{judge.backend}` (`{judge.constitution}`) on `{cfg.eval.prompts}`, the policy's greedy answers judged "
            f"in both orders against the start's. An arm RULE@F judges at most F × 2 × {cfg.prompts_per_round} calls "
            f"per round (annotate.budget.calls_per_round), chosen by annotate.select.rule RULE. Win rates: the mean "
            f"over seeds × held-out prompts (win 1, tie 0.5), with a 95% interval from {RESAMPLES} bootstrap "
            f"draws of seeds and then prompts within them; differences are paired by seed and prompt.")

    def last(arm: str) -> dict[str, dict]:
        return {s: rows[-1] for s, rows in stored[arm]["seeds"].items()}

    rows = []
    for arm in order:
        scores = {s: round_scores(out, arm, s, row["round"]) for s, row in last(arm).items()}
        minus_final = minus_same = "-"
        if BASELINE in stored and arm != BASELINE:
            base_runs = stored[BASELINE]["seeds"]
            common = [s for s in scores if s in base_runs]
            base_final = [round_scores(out, BASELINE, s, base_runs[s][-1]["round"]) for s in common]
            base_same = [round_scores(out, BASELINE, s,
                                      same_calls_round(base_runs[s], last(arm)[s]["budget/judge_calls"]))
                         for s in common]
            minus_final = with_interval(paired([scores[s] for s in common], base_final), "+.3f")
            minus_same = with_interval(paired([scores[s] for s in common], base_same), "+.3f")
        accuracy = [r["select/proxy_accuracy"] for rs in stored[arm]["seeds"].values() for r in rs[1:]]
        rows.append([arm, mean_sd([r["budget/judge_calls"] for r in last(arm).values()], ".0f"),
                     with_interval([list(v.values()) for v in scores.values()]),
                     " ".join(f"{r['eval/win_rate_vs_ref']:.2f}" for r in last(arm).values()),
                     minus_final, minus_same,
                     mean_sd([sum(r["pairs_kept"] for r in rs) for rs in stored[arm]["seeds"].values()], ".0f"),
                     fmt(mean_spread([a for a in accuracy if a is not None])[0]),
                     f"{fmt(stored[arm].get('minutes'), '.1f')} min on {stored[arm]['cpu']}"])
    summary = table(["arm", "judge calls spent", "final win rate vs start [95%]", "per seed",
                     f"minus {BASELINE}'s final [95%]", f"minus {BASELINE} at the same calls [95%]",
                     "pairs trained on", "proxy accuracy (rounds 1+)", "made in"], rows)
    (out / "table.md").write_text(summary + "\n")
    res.add(f"After round {cfg.rounds - 1}:\n\n{summary}\n\n\"At the same calls\": {BASELINE}'s evaluation after the "
            f"last round by which it had spent no more judge calls than the arm did in all (same seed). Proxy "
            f"accuracy: the share of a round's agreeing verdicts whose winner the proxy (fit on the rounds before) "
            f"picked. Commands: " + "; ".join(f"{a}: `{stored[a]['command']}`" for a in order))
    curves = {arm: curve(out, arm, stored[arm]) for arm in order}
    fractions = sorted({a.split("@")[1] for a in order if a != BASELINE}, key=float, reverse=True)
    res.plot("win_rate.png", "Held-out win rate by judge calls spent (band: 95% interval)",
             "judge calls spent (run total)",
             [(f"win rate, rules at {f}",
               {a: curves[a] for a in order if a == BASELINE or a.endswith(f"@{f}")}) for f in fractions],
             reference=0.5)
    return res.write(f"`.venv/bin/python scripts/experiments/judge_budget.py` runs every arm; `--only ARM` reruns "
                     f"some and keeps the others' stored results (DIR/arms/ARM.json, and each run's eval records "
                     f"in DIR/runs/); written {time.strftime('%Y-%m-%d')}.")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="key=value, as for oaif run (e.g. rounds=4)")
    ap.add_argument("--config", default=str(ROOT / "configs/experiments/online_offline_tiny.yaml"))
    ap.add_argument("--only", default=",".join(ARMS), help="arms RULE@FRACTION, comma-separated; empty: rewrite "
                                                           "results.md from the stored ones")
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--out", type=Path, default=Path("runs/experiments/judge_budget"))
    args = ap.parse_args(argv)
    cfg = oaif.load_config(args.config, args.overrides)
    check_model(cfg.policy.model, "policy.model")
    arms = [a.strip() for a in args.only.split(",") if a.strip()]
    for arm in arms:   # each arm's config checked before any runs
        rule, _, fraction = arm.partition("@")
        if not fraction.replace(".", "", 1).isdigit():
            raise SystemExit(f"--only: {arm!r} is not RULE@FRACTION (e.g. sea@0.5)")
        oaif.load_config(args.config, [*args.overrides, f"generate.samples_per_prompt={SAMPLES}",
                                       f"annotate.select.rule={rule}"])
    seeds = [int(s) for s in args.seeds.split(",")]
    res = Results(args.out, "Judge calls against win rate: choosing the comparisons")
    (args.out / "arms").mkdir(parents=True, exist_ok=True)
    if arms and cfg.annotate.backend == "reward_model" and not Path(cfg.annotate.model).exists():
        print(f"distilling the training annotator into {cfg.annotate.model} ...", flush=True)
        distil_reward_model(cfg, Path(cfg.annotate.model))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").is_file() else "unknown"
    command = " ".join([".venv/bin/python", "scripts/experiments/judge_budget.py", *(argv or sys.argv[1:])])
    for arm in arms:
        t0 = time.perf_counter()
        result = run_arm(cfg, arm, seeds, args.out) | {"cpu": cpu, "command": command,
                                                       "minutes": (time.perf_counter() - t0) / 60}
        (args.out / "arms" / f"{arm}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"results in {write(args.out, res, cfg)}")


if __name__ == "__main__":
    main()
