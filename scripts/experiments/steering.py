"""Steering by constitution (OAIF paper §4.6; issue 16). The same policy is trained from the
same start on the same prompts, seed and settings once per arm; the arms differ only in
`annotate.constitution`. The paper's annotator asked for "helpful and very short" cut mean
response length from ~120 to ~40 tokens while staying preferred to the SFT model; here the
default arms are `helpful` (the correct answer wins) and `concise` (`concise_correct.yaml`:
the correct answer, then the shorter), judged by the `rules` backend, since no LLM judge that
runs on this CPU carries signal. Each arm's policy is evaluated against its start on held-out
prompts by the config's `eval.annotate` judge every `eval.every` rounds.

    .venv/bin/python scripts/experiments/steering.py [--config FILE] [--arms a=FILE,b=FILE]
        [--out DIR] [--quick] [key=value ...]

Writes DIR/results.md (the table, samples of each final policy beside the start's, the
command and the wall time), DIR/lengths.png, DIR/win_rate.png, and each arm's run directory
DIR/ARM. key=value overrides go to every arm. --quick: the tiny policy for 2 rounds under
length rules (configs/experiments/steering_tiny.yaml), a check of the plumbing in ~1 min.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # results.py, beside this file

import oaif
from oaif.constitution import load_constitution, matches_reference
from oaif.evaluation import eval_prompts
from oaif.records import read_jsonl
from results import Results, check_model, fmt, table

CONFIG = "configs/experiments/steering_smollm2.yaml"
ARMS = "helpful=constitutions/helpful.yaml,concise=constitutions/concise_correct.yaml"
QUICK_CONFIG = "configs/experiments/steering_tiny.yaml"
QUICK_ARMS = "detailed=constitutions/detailed.yaml,concise=constitutions/concise.yaml"
SET_PER_ARM = ("name", "output_dir", "annotate.constitution")   # the script's, not the user's
SAMPLES = 4   # held-out prompts whose answers results.md shows: the first ones, not picked


def parse_arms(text: str) -> list[tuple[str, str]]:
    """'name=constitution,...' -> [(name, path)]; at least two arms, distinct names, files that exist."""
    arms = []
    for item in text.split(","):
        name, sep, path = item.strip().partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or not path:
            raise SystemExit(f"--arms: {item!r} is not NAME=CONSTITUTION (NAME: letters, digits, '.', '-', '_')")
        if not Path(path).is_file():
            raise SystemExit(f"--arms: constitution file {path} not found")
        arms.append((name, path))
    if len(arms) < 2 or len({n for n, _ in arms}) != len(arms):
        raise SystemExit(f"--arms: give at least two arms with distinct names, got {text!r}")
    return arms


def check_overrides(overrides: list[str]) -> None:
    for o in overrides:
        key = o.partition("=")[0]
        if key in SET_PER_ARM:
            raise SystemExit(f"{key} is set per arm by this script: use --arms and --out instead")


def run_arm(config: str, name: str, constitution: str, out: Path, overrides: list[str]) -> dict:
    """One arm's run through the Python API; what the report needs from its records."""
    cfg = oaif.load_config(config, [*overrides, f"name={name}", f"output_dir={out}", "overwrite=true",
                                    f"annotate.constitution={constitution}"])
    t0 = time.perf_counter()
    run_dir = oaif.run(cfg)
    minutes = (time.perf_counter() - t0) / 60
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = [m for m in metrics if "eval/win_rate_vs_ref" in m]
    if not evals:
        raise SystemExit(f"{run_dir}: no evaluation in metrics.jsonl (the config needs eval.every > 0)")
    last = evals[-1]
    return {"name": name, "constitution": constitution, "cfg": cfg, "minutes": minutes,
            "metrics": metrics, "evals": evals, "final": last,
            "answers": {r["prompt_id"]: r for r in read_jsonl(run_dir / "eval" / f"round_{last['round']:06d}.jsonl")},
            "baseline": {r["prompt_id"]: r["text"] for r in read_jsonl(run_dir / "eval" / "baseline.jsonl")}}


def accuracy(texts: dict[str, str], references: dict[str, tuple[str, ...]]) -> float | None:
    """Share of the answers that contain an accepted answer (the `matches_reference` rule);
    None when the held-out prompts carry no references."""
    judged = [matches_reference(t, references[pid]) for pid, t in texts.items() if references.get(pid)]
    return sum(judged) / len(judged) if judged else None


def shares_eval_rules(constitution: str, eval_constitution: str) -> bool:
    """Whether the arm was trained on every rule the evaluation judges by: then the
    win rate measures how its own training rule carries to new prompts, not an independent view."""
    checks = lambda path: {r.check for r in load_constitution(path).rules}   # noqa: E731
    judge = checks(eval_constitution)
    return bool(judge) and judge <= checks(constitution)


def report(res: Results, arms: list[dict]) -> None:
    first = arms[0]
    eval_cfg = first["cfg"].eval
    eval_constitution = eval_cfg.annotate.constitution if eval_cfg.annotate else first["constitution"]
    references = {p.id: p.references for p in eval_prompts(first["cfg"])}
    start_acc = accuracy(first["baseline"], references)
    # --quick evaluates on its training prompts (the tiny policy has no held-out set): say so.
    where = "held-out" if eval_cfg.prompts != first["cfg"].prompts else "eval (training prompts)"

    def ratio(a: float, b: float) -> str:
        return fmt(a / b, ".2f") if b else "-"

    rows = []
    for arm in arms:
        m, f = arm["metrics"], arm["final"]
        ci = f"[{fmt(f['eval/win_rate_ci_low'])}, {fmt(f['eval/win_rate_ci_high'])}]"
        acc = accuracy({pid: r["policy"] for pid, r in arm["answers"].items()}, references)
        rows.append([
            f"`{arm['name']}`", f"`{arm['constitution']}`",
            f"{sum(r['pairs_kept'] for r in m)} / {sum(r['pairs_kept'] + r['pairs_dropped'] for r in m)}",
            f"{fmt(m[0]['generate/mean_length'], '.1f')} → {fmt(m[-1]['generate/mean_length'], '.1f')}",
            ratio(m[-1]["generate/mean_length"], first["metrics"][-1]["generate/mean_length"]),
            f"{fmt(f['eval/baseline_mean_length'], '.1f')} → {fmt(f['eval/mean_length'], '.1f')}",
            ratio(f["eval/mean_length"], first["final"]["eval/mean_length"]),
            "-" if acc is None else f"{fmt(start_acc, '.2f')} → {fmt(acc, '.2f')}",
            f"{fmt(f['eval/win_rate_vs_ref'])} {ci} ({f['eval/wins']} W / {f['eval/ties']} T / {f['eval/losses']} L)",
            fmt(f["eval/lc_win_rate_vs_ref"]), fmt(f["eval/kl_to_ref"], ".2f"), fmt(arm["minutes"], ".1f")])
    cfg = first["cfg"]
    last_round = first["metrics"][-1]["round"]
    own = [f"`{a['name']}`" for a in arms if shares_eval_rules(a["constitution"], eval_constitution)]
    res.add(
        f"Policy `{cfg.policy.model}`, {cfg.rounds} rounds × {cfg.prompts_per_round} prompts of `{cfg.prompts}` "
        f"× {cfg.generate.samples_per_prompt} samples (≤ {cfg.generate.max_new_tokens} tokens), "
        f"`{cfg.annotate.backend}` judge, {cfg.train.loss} lr {cfg.train.learning_rate:g}"
        f"{' (LoRA)' if cfg.train.lora.enabled else ''}, seed {cfg.seed}; the arms differ only in the constitution. "
        f"Evaluation after round {last_round}: each final policy against the start on "
        f"{len(first['answers'])} prompts of `{eval_cfg.prompts}` (greedy), judged in both orders by "
        f"`{eval_constitution}` (`{cfg.eval.annotate.backend if cfg.eval.annotate else cfg.annotate.backend}`)."
        + (f" That judge's rules are among those {', '.join(own)} trained on: for "
           f"{'that arm' if len(own) == 1 else 'those arms'} the win rate grades by its own training rule."
           if own else ""))
    res.add(table(
        ["arm", "constitution", "pairs kept", f"train samples, mean tokens (round 0 → {last_round})", f"÷ `{first['name']}`",
         f"{where} answers, mean tokens (start → final)", f"÷ `{first['name']}`", f"{where} correct (start → final)",
         "win rate vs start [95% CI]", "LC win rate", "KL to start (nats)", "minutes"], rows))
    res.add(f"\"correct\": the share of {where} answers that contain an accepted answer (`matches_reference`); "
            "'-' when the prompts carry no references. Pairs kept: those both orders of the judge preferred the "
            "same way (a tie, e.g. two correct answers under a correctness rule, trains nothing). A win needs both orders to prefer the policy; "
            "ties count half.")

    res.add(f"## {where.capitalize()} evaluations, round by round\n\n" + table(
        ["arm", "round", "mean tokens", "win rate vs start [95% CI]", "LC win rate", "KL to start"],
        [[f"`{a['name']}`", e["round"], fmt(e["eval/mean_length"], ".1f"),
          f"{fmt(e['eval/win_rate_vs_ref'])} [{fmt(e['eval/win_rate_ci_low'])}, {fmt(e['eval/win_rate_ci_high'])}]",
          fmt(e["eval/lc_win_rate_vs_ref"]), fmt(e["eval/kl_to_ref"], ".2f")] for a in arms for e in a["evals"]]))

    rounds = lambda a: [m["round"] for m in a["metrics"]]                     # noqa: E731
    eval_x = lambda a: [-1] + [e["round"] for e in a["evals"]]                 # noqa: E731
    res.plot("lengths.png", "Mean response length per round", "round (-1: the start)", [
        ("train samples, mean tokens", {a["name"]: (rounds(a), [m["generate/mean_length"] for m in a["metrics"]])
                                        for a in arms}),
        (f"{where} answers, mean tokens", {a["name"]: (eval_x(a), [a["evals"][0]["eval/baseline_mean_length"]]
                                                       + [e["eval/mean_length"] for e in a["evals"]]) for a in arms})])
    evals = lambda a, key: [e[key] for e in a["evals"]]                       # noqa: E731
    res.plot("win_rate.png", f"{where.capitalize()} win rate vs the start (judge: {Path(eval_constitution).stem})", "round", [
        ("win rate [95% CI]", {a["name"]: ([e["round"] for e in a["evals"]], evals(a, "eval/win_rate_vs_ref"),
                                           evals(a, "eval/win_rate_ci_low"), evals(a, "eval/win_rate_ci_high"))
                               for a in arms}),
        ("LC win rate", {a["name"]: ([e["round"] for e in a["evals"]], evals(a, "eval/lc_win_rate_vs_ref"))
                         for a in arms})], reference=0.5)

    shown = sorted(first["answers"])[:SAMPLES]
    lines = [f"## Samples: the first {len(shown)} {where} prompts, greedy, after round {last_round}"]
    for pid in shown:
        question = first["answers"][pid]["messages"][-1]["content"]
        refs = references.get(pid) or ()
        lines.append(f"**{question}**" + (f" (accepted: {', '.join(refs)})" if refs else ""))
        lines.append("\n".join([f"- start: {json.dumps(first['baseline'][pid], ensure_ascii=False)}"]
                               + [f"- `{a['name']}`: {json.dumps(a['answers'][pid]['policy'], ensure_ascii=False)} "
                                  f"({a['answers'][pid]['outcome']} vs start)" for a in arms]))
    lines.append("Every comparison, with both orders' judgments: `ARM/eval/round_XXXXXX.jsonl` in this folder.")
    res.add("\n\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"base config of every arm (default {CONFIG}; --quick: {QUICK_CONFIG})")
    parser.add_argument("--arms", help=f"NAME=CONSTITUTION,... the first is the one lengths are divided by "
                                       f"(default {ARMS}; --quick: {QUICK_ARMS})")
    parser.add_argument("--out", help="output folder; each arm's run directory goes in it (default: the config's output_dir)")
    parser.add_argument("--quick", action="store_true", help="the tiny policy, 2 rounds, length rules: a plumbing check")
    parser.add_argument("overrides", nargs="*", help="key=value for every arm's config, e.g. threads=1 rounds=4")
    args = parser.parse_args()

    config = args.config or (QUICK_CONFIG if args.quick else CONFIG)
    arms = parse_arms(args.arms or (QUICK_ARMS if args.quick else ARMS))
    check_overrides(args.overrides)
    try:
        base = oaif.load_config(config, args.overrides)   # bad keys fail here, before any run
    except oaif.ConfigError as e:
        raise SystemExit(f"error: {e}")
    check_model(base.policy.model, "policy.model")
    out = Path(args.out or base.output_dir)
    res = Results(out, "Steering by constitution")
    done = [run_arm(config, name, constitution, out, args.overrides) for name, constitution in arms]
    report(res, done)
    print(f"results in {res.write()}")


if __name__ == "__main__":
    main()
