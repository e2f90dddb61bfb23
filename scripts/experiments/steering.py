"""Steering by constitution (OAIF paper §4.6; issues 16, 30). The same policy is trained from
the same start on the same prompts and settings once per arm and seed; the arms differ only
in `annotate.constitution`. The paper's annotator asked for "helpful and very short" cut mean
response length from ~120 to ~40 tokens while staying preferred to the SFT model. Here the
default arms, judged by the `rules` backend (no LLM judge that runs on this CPU carries
signal), are `control` (`correct_random.yaml`: the correct answer, then a seeded coin),
`helpful` (the correct answer wins, ties stay ties) and `concise` (`concise_correct.yaml`:
the correct answer, then the shorter). `control` decides every pair of different answers, so at
least as many as `concise` (which leaves equal lengths tied), but steers nothing besides
correctness: the two differ by the length rule, not by the amount of signal.

The main measure is held-out accuracy: the share of answers that contain an accepted answer
(`matches_reference`), which every default arm also trains on. The held-out set (the config's
`eval.prompts`, with references) is split once by a fixed draw: a third is the validation
set, which each run answers every `eval.every` rounds (with a checkpoint each time); the
checkpoint with the best validation accuracy (the later one on a tie) then answers the test
set, the other two thirds, once. Its change in test accuracy against the start is paired
per prompt: per seed McNemar's exact test and a Wald interval, and pooled over seeds per
prompt (the seeds' differences on a prompt averaged first).

    .venv/bin/python scripts/experiments/steering.py [--config FILE] [--arms a=FILE,b=FILE]
        [--seeds 0,1,2] [--out DIR] [--quick] [key=value ...]

Writes DIR/results.md (the tables, samples of each chosen policy beside the start's, the
command and the wall time), DIR/lengths.png, DIR/validation.png, the split DIR/split/
{validation,test}.jsonl, and each run's directory DIR/ARM/seedS (its test comparison in
evals/, its steering.json once done). A run whose steering.json records the same resolved
config is read back, not run again: an interrupted invocation resumes, and seeds run as
separate invocations into one folder are reported together by one more with all of them.
key=value overrides go to every run. --quick: the tiny policy for 2 rounds, two arms
and two seeds (configs/experiments/steering_tiny.yaml), a check of the plumbing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # results.py, beside this file

import oaif
from oaif import outputs
from oaif.bundled import data_path
from oaif.config import to_dict
from oaif.constitution import load_constitution, matches_reference
from oaif.datasets_io import load_prompts
from oaif.evaluation import eval_prompts
from oaif.records import Prompt, read_jsonl
from results import ROOT, Results, check_model, fmt, mean_sd, paired_difference, sign_test, table

CONFIG = "configs/experiments/steering_smollm2.yaml"
ARMS = ("control=constitutions/correct_random.yaml,helpful=constitutions/helpful.yaml,"
        "concise=constitutions/concise_correct.yaml")
SEEDS = "0,1,2"
QUICK_CONFIG = "configs/experiments/steering_tiny.yaml"
QUICK_ARMS = "control=constitutions/correct_random.yaml,concise=constitutions/concise_correct.yaml"
QUICK_SEEDS = "0,1"
# The script's keys, not the user's: per run, or what checkpoint selection needs.
SET_PER_RUN = ("name", "output_dir", "seed", "annotate.constitution", "train.checkpoint_every",
               "train.keep_checkpoints", "eval.policy")
SPLIT_KIND = "steering split"   # oaif/outputs.py: a file this script wrote, and may replace
DONE, DONE_KIND = "steering.json", "steering run"   # in a run's directory once its test answers are in
SAMPLES = 4   # test prompts whose answers results.md shows: the first ones by id, not picked


def parse_arms(text: str) -> list[tuple[str, str]]:
    """'name=constitution,...' -> [(name, path)]; at least two arms, distinct names, constitutions
    that exist (a file, a bundled name, or a path of oaif's source tree: the config's rules)."""
    arms = []
    for item in text.split(","):
        name, sep, path = item.strip().partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or not path:
            raise SystemExit(f"--arms: {item!r} is not NAME=CONSTITUTION (NAME: letters, digits, '.', '-', '_')")
        if not data_path(path).is_file():
            raise SystemExit(f"--arms: constitution {path} not found (give a file, or a bundled name: oaif constitutions)")
        arms.append((name, path))
    if len(arms) < 2 or len({n for n, _ in arms}) != len(arms):
        raise SystemExit(f"--arms: give at least two arms with distinct names, got {text!r}")
    return arms


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds: {text!r} is not a comma-separated list of integers") from None
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds: {text!r} repeats a seed")
    return seeds


def check_overrides(overrides: list[str]) -> None:
    for o in overrides:
        key = o.partition("=")[0]
        if key in SET_PER_RUN:
            raise SystemExit(f"{key} is set per run by this script: use --arms, --seeds and --out instead")


def split_held_out(base: oaif.RunConfig) -> tuple[list[Prompt], list[Prompt]]:
    """The held-out prompts (eval.prompts, its first eval.max_prompts) as validation (a third)
    and test (the rest). One draw with a fixed seed, not the runs' seeds: every arm and seed
    answers the same test prompts, so results pair up per prompt. Refused: a held-out prompt
    without references (accuracy is the measure) or one the runs train on."""
    held_out = eval_prompts(base)
    if not all(p.references for p in held_out):
        raise SystemExit(f"eval.prompts={base.eval.prompts}: every held-out prompt needs references (accepted "
                         f"answers): held-out accuracy is this experiment's measure")
    trained = {json.dumps(p.messages) for p in load_prompts(base.prompts, "prompts", base.prompts_column,
                                                            base.prompts_split)}
    shared = [p.id for p in held_out if json.dumps(p.messages) in trained]
    if shared:
        raise SystemExit(f"eval.prompts shares {len(shared)} prompts with the training prompts ({', '.join(shared[:3])}"
                         f"{', ...' if len(shared) > 3 else ''}): the test set must be held out")
    order = sorted(held_out, key=lambda p: p.id)
    random.Random(0).shuffle(order)
    k = len(order) // 3
    if k == 0:
        raise SystemExit(f"eval.prompts: {len(order)} held-out prompts are too few to split into validation and test")
    return order[:k], order[k:]


def write_split(out: Path, validation: list[Prompt], test: list[Prompt]) -> tuple[Path, Path]:
    """DIR/split/{validation,test}.jsonl, replacing only files this script wrote there."""
    (out / "split").mkdir(parents=True, exist_ok=True)
    paths = out / "split" / "validation.jsonl", out / "split" / "test.jsonl"
    for path, part in zip(paths, (validation, test)):
        outputs.write_jsonl(path, SPLIT_KIND, part, overwrite=True)
    return paths


def correct(texts: dict[str, str], references: dict[str, tuple[str, ...]]) -> dict[str, bool]:
    """Per prompt id: whether the answer contains an accepted answer (the `matches_reference` rule)."""
    return {pid: matches_reference(text, references[pid]) for pid, text in texts.items()}


def share(flags: dict[str, bool]) -> float:
    return sum(flags.values()) / len(flags)


def run_one(config: str, arm: str, constitution: str, seed: int, out: Path, overrides: list[str], every: int,
            split: tuple[Path, Path], references: dict[str, tuple[str, ...]]) -> dict:
    """One arm at one seed through the Python API: the run, validation accuracy at every
    evaluated round, the chosen checkpoint's answers to the test set; what the report needs.
    A run that finished before with the same resolved config (its DONE file says) is read back,
    not run again: an interrupted invocation resumes where it stopped."""
    # A checkpoint wherever the validation set is answered (the same rule: every `every`
    # rounds and after the last), all of them kept, so the best one can answer the test set.
    cfg = oaif.load_config(config, [*overrides, f"name=seed{seed}", f"output_dir={out / arm}", "overwrite=true",
                                    f"seed={seed}", f"annotate.constitution={constitution}",
                                    f"eval.prompts={split[0]}", "eval.max_prompts=0",
                                    f"train.checkpoint_every={every}", "train.keep_checkpoints=0"])
    run_dir, resolved = out / arm / f"seed{seed}", to_dict(cfg)
    done = json.loads((run_dir / DONE).read_text()) if (run_dir / DONE).is_file() else None
    reused = done is not None and done["config"] == resolved
    if not reused:
        t0 = time.perf_counter()
        run_dir = oaif.run(cfg)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = [m for m in metrics if "eval/win_rate_vs_ref" in m]
    validation = {e["round"]: share(correct({r["prompt_id"]: r["policy"] for r in
                                             read_jsonl(run_dir / "eval" / f"round_{e['round']:06d}.jsonl")},
                                            references)) for e in evals}
    start = share(correct({r["prompt_id"]: r["text"] for r in read_jsonl(run_dir / "eval" / "baseline.jsonl")},
                          references))
    # The best validation accuracy; on a tie the later round: as good on validation, steered longer.
    chosen = max(validation, key=lambda r: (validation[r], r))
    if not reused:
        checkpoint = run_dir / "checkpoints" / f"round_{chosen:06d}"
        test_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, prompts=str(split[1]),
                                                                     policy=str(checkpoint)))
        test = oaif.evaluate(test_cfg, log=lambda line: None)   # writes run_dir/evals/round_<chosen>.jsonl
        done = {"config": resolved, "test": test, "minutes": (time.perf_counter() - t0) / 60}
        outputs.write_file(run_dir / DONE, DONE_KIND, lambda f: json.dump(done, f, indent=1), overwrite=True)
    records = read_jsonl(run_dir / "evals" / f"round_{chosen:06d}.jsonl")
    return {"arm": arm, "constitution": constitution, "seed": seed, "cfg": cfg, "metrics": metrics,
            "evals": evals, "validation": validation, "validation_start": start, "chosen": chosen,
            "test": done["test"], "records": {r["prompt_id"]: r for r in records},
            "minutes": done["minutes"], "reused": reused}


def report(res: Results, runs: list[dict], arms: list[tuple[str, str]], seeds: list[int], held_out: str,
           n_val: int, n_test: int, references: dict[str, tuple[str, ...]]) -> None:
    first = runs[0]
    cfg = first["cfg"]
    by_arm = {name: [r for r in runs if r["arm"] == name] for name, _ in arms}
    ids = sorted(set.intersection(*(set(r["records"]) for r in runs)))   # test prompts every run answered

    def flags(run: dict, side: str) -> list[bool]:
        """Per test prompt (ids), whether `side` (policy: the chosen checkpoint; baseline: the start) was correct."""
        return list(correct({pid: run["records"][pid][side] for pid in ids}, references).values())

    def change(run: dict) -> list[int]:
        return [int(f) - int(s) for f, s in zip(flags(run, "policy"), flags(run, "baseline"))]

    def per_prompt_mean(rows: list[list[int]]) -> list[float]:
        return [statistics.fmean(col) for col in zip(*rows)]

    def interval(diffs: list[float]) -> str:
        mean, low, high = paired_difference(diffs)
        return f"{fmt(mean, '+.3f')} [{fmt(low, '+.3f')}, {fmt(high, '+.3f')}]"

    eval_cfg = cfg.eval.annotate or cfg.annotate
    judge = f"`{eval_cfg.constitution}` (`{eval_cfg.backend}`)"
    # Only the rules backend trains on the constitutions' rules; an LLM judge reads their principles.
    checks = {name: [rule.check for rule in load_constitution(path).rules] if cfg.annotate.backend == "rules" else []
              for name, path in arms}
    trained_on_it = [f"`{name}`" for name, _ in arms if "matches_reference" in checks[name]]
    only_rule = [f"`{name}`" for name, _ in arms if checks[name] == ["matches_reference"]]
    same_start = all([r["records"][pid]["baseline"] for pid in ids] == [first["records"][pid]["baseline"] for pid in ids]
                     for r in runs)
    res.add(
        f"Policy `{cfg.policy.model}`, {cfg.rounds} rounds × {cfg.prompts_per_round} prompts of `{cfg.prompts}` "
        f"× {cfg.generate.samples_per_prompt} samples (≤ {cfg.generate.max_new_tokens} tokens), "
        f"`{cfg.annotate.backend}` judge, {cfg.train.loss} lr {cfg.train.learning_rate:g}"
        f"{' (LoRA)' if cfg.train.lora.enabled else ''}, seeds {', '.join(map(str, seeds))}; the arms differ only "
        f"in the constitution. The held-out questions of `{held_out}` are split once by a fixed draw: {n_val} "
        f"validation, {n_test} test (`split/`). Each run answers the validation questions after rounds "
        f"{', '.join(str(e['round']) for e in first['evals'])} (greedy) with a checkpoint each time; the one with the "
        f"best validation accuracy (the later on a tie) answers the {len(ids)} test questions once.")
    res.add(
        "**Read this first.** The measure, \"correct\" (the answer contains an accepted answer: "
        "`matches_reference`), " + (
            f"is also a training rule: {', '.join(trained_on_it)} trained on it, so a change in accuracy is partly "
            f"that training rule carried to new questions, not an independent view of helpfulness"
            + (f"; for {', '.join(only_rule)} it is the whole training rule." if only_rule else ".")
            if trained_on_it else f"is no arm's training rule (the training judge: `{cfg.annotate.backend}`).")
        + f" The win rate column is the evaluation judge's, {judge}, on the same test pairs.")

    rows = []
    for name, path in arms:
        group = by_arm[name]
        kept = [sum(m["pairs_kept"] for m in r["metrics"]) for r in group]
        total = [sum(m["pairs_kept"] + m["pairs_dropped"] for m in r["metrics"]) for r in group]
        start_acc = [statistics.fmean(flags(r, "baseline")) for r in group]
        final_acc = [statistics.fmean(flags(r, "policy")) for r in group]
        pooled = per_prompt_mean([change(r) for r in group])
        length = [r["test"]["eval/mean_length"] for r in group]
        rows.append([
            f"`{name}`", f"`{path}`", f"{mean_sd(kept, '.1f')} / {fmt(statistics.fmean(total), '.0f')}",
            " ".join(str(r["chosen"]) for r in group),
            f"{fmt(statistics.fmean(start_acc), '.3f')} → {mean_sd(final_acc)}",
            interval(pooled), fmt(sign_test(pooled), ".3g"),
            f"{fmt(group[0]['test']['eval/baseline_mean_length'], '.1f')} → {mean_sd(length, '.1f')}",
            fmt(statistics.fmean(length) / statistics.fmean([r["test"]["eval/mean_length"] for r in by_arm[arms[0][0]]]),
                ".2f"),
            mean_sd([r["test"]["eval/win_rate_vs_ref"] for r in group]),
            mean_sd([r["test"]["eval/kl_to_ref"] for r in group], ".2f"),
            fmt(statistics.fmean([r["minutes"] for r in group]), ".1f")])
    res.add("## Test set, checkpoints chosen on validation\n\n" + table(
        ["arm", "constitution", "pairs kept (of)", "chosen round per seed", "test correct: start → chosen",
         "change in correct [95% CI]", "sign test p", "test answers, mean tokens (start → chosen)",
         f"÷ `{arms[0][0]}`", "win rate vs start", "KL to start (nats)", "minutes per run"], rows))
    res.add(
        f"Mean ± sd over {len(seeds)} seeds. The change in correct is paired per test question: each seed's "
        "chosen checkpoint against the start on the same question (+1 now right, −1 now wrong, 0 unchanged), "
        "averaged over the seeds into one difference per question, then a Wald 95% interval over the "
        f"{len(ids)} questions; the sign test counts the questions that moved up against those that moved down "
        "(with one seed it is McNemar's exact test). Pairs kept: those both orders of the training judge "
        "preferred the same way (a tie, e.g. two correct answers under the correctness rule alone, trains "
        "nothing). A win needs both orders of the evaluation judge to prefer the policy; ties count half. "
        + ("The start answered every test question the same way in every run." if same_start else
           "The start's test answers differ between runs (each run is paired with its own)."))

    diffs = []
    for name, _ in arms[1:]:
        d = [a - b for a, b in zip(per_prompt_mean([flags(r, "policy") for r in by_arm[name]]),
                                   per_prompt_mean([flags(r, "policy") for r in by_arm[arms[0][0]]]))]
        diffs.append([f"`{name}` − `{arms[0][0]}`", interval(d), fmt(sign_test(d), ".3g")])
    res.add(f"## Arms against `{arms[0][0]}` on the test set\n\n" + table(
        ["arms", "difference in correct [95% CI]", "sign test p"], diffs)
        + "\n\nPer test question, each arm's correct share over the seeds, differenced; interval and test as above.")

    per_seed = []
    for r in runs:
        d = change(r)
        ups, downs = d.count(1), d.count(-1)
        validation = " · ".join(f"{'**' if k == r['chosen'] else ''}{k}: {v:.2f}{'**' if k == r['chosen'] else ''}"
                                for k, v in r["validation"].items())
        per_seed.append([
            f"`{r['arm']}`", r["seed"], f"{r['validation_start']:.2f} → {validation}",
            f"{fmt(statistics.fmean(flags(r, 'baseline')))} → {fmt(statistics.fmean(flags(r, 'policy')))}",
            f"{ups} / {downs}", interval(d), fmt(sign_test(d), ".3g"),
            fmt(r["test"]["eval/mean_length"], ".1f"), fmt(r["test"]["eval/kl_to_ref"], ".2f")])
    res.add("## Per seed\n\n" + table(
        ["arm", "seed", "validation correct: start → round: share (chosen in bold)", "test correct: start → chosen",
         "wrong → right / right → wrong", "change [95% CI]", "McNemar exact p", "test answers, mean tokens",
         "KL to start"], per_seed))

    def band(series: list[list[float]]) -> tuple[list, list, list]:
        cols = list(zip(*series))
        return [statistics.fmean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]

    rounds = [m["round"] for m in first["metrics"]]
    eval_x = [-1] + [e["round"] for e in first["evals"]]
    res.plot("lengths.png", "Mean response length per round (mean over seeds; band: range)", "round (-1: the start)", [
        ("train samples, mean tokens", {name: (rounds, *band([[m["generate/mean_length"] for m in r["metrics"]]
                                                              for r in by_arm[name]])) for name, _ in arms}),
        ("validation answers, mean tokens", {name: (eval_x, *band([[r["evals"][0]["eval/baseline_mean_length"]]
                                                                   + [e["eval/mean_length"] for e in r["evals"]]
                                                                   for r in by_arm[name]])) for name, _ in arms})])
    res.plot("validation.png", "Validation correct per round (mean over seeds; band: range)", "round (-1: the start)", [
        ("share correct", {name: (eval_x, *band([[r["validation_start"], *r["validation"].values()]
                                                 for r in by_arm[name]])) for name, _ in arms})])

    lines = [f"## Samples: the first {SAMPLES} test questions, greedy, seed {seeds[0]}'s chosen checkpoints"]
    for pid in ids[:SAMPLES]:
        record = first["records"][pid]
        mark = lambda text: "right" if matches_reference(text, references[pid]) else "wrong"   # noqa: E731
        lines.append(f"**{record['messages'][-1]['content']}** (accepted: {', '.join(references[pid])})")
        lines.append("\n".join(
            [f"- start: {json.dumps(record['baseline'], ensure_ascii=False)} ({mark(record['baseline'])})"]
            + [f"- `{name}`: {json.dumps(text, ensure_ascii=False)} ({mark(text)})"
               for name, _ in arms for text in [by_arm[name][0]["records"][pid]["policy"]]]))
    lines.append("Every test comparison, with both orders' judgments: `ARM/seedS/evals/round_XXXXXX.jsonl`; "
                 "every validation one: `ARM/seedS/eval/`.")
    res.add("\n\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"base config of every run (default {CONFIG}; --quick: {QUICK_CONFIG})")
    parser.add_argument("--arms", help=f"NAME=CONSTITUTION,... the first is the one the others are compared with "
                                       f"(default {ARMS}; --quick: {QUICK_ARMS})")
    parser.add_argument("--seeds", help=f"the seeds every arm runs with (default {SEEDS}; --quick: {QUICK_SEEDS})")
    parser.add_argument("--out", help="output folder; each run's directory goes in it (default: the config's output_dir)")
    parser.add_argument("--quick", action="store_true", help="the tiny policy, 2 rounds, 2 arms, 2 seeds: a plumbing check")
    parser.add_argument("overrides", nargs="*", help="key=value for every run's config, e.g. threads=1 rounds=4")
    args = parser.parse_args()

    config = args.config or str(ROOT / (QUICK_CONFIG if args.quick else CONFIG))   # the defaults from any folder
    arms = parse_arms(args.arms or (QUICK_ARMS if args.quick else ARMS))
    seeds = parse_seeds(args.seeds or (QUICK_SEEDS if args.quick else SEEDS))
    check_overrides(args.overrides)
    try:
        base = oaif.load_config(config, args.overrides)   # bad keys fail here, before any run
    except oaif.ConfigError as e:
        raise SystemExit(f"error: {e}")
    if base.eval.every < 1:
        raise SystemExit("eval.every must be >= 1: the validation answers at those rounds choose the checkpoint")
    check_model(base.policy.model, "policy.model")
    validation, test = split_held_out(base)
    out = Path(args.out or base.output_dir)
    res = Results(out, "Steering by constitution")
    split = write_split(out, validation, test)
    references = {p.id: p.references for p in validation + test}
    runs = [run_one(config, name, constitution, seed, out, args.overrides, base.eval.every, split, references)
            for seed in seeds for name, constitution in arms]
    report(res, runs, arms, seeds, base.eval.prompts, len(validation), len(test), references)
    reused = sum(r["reused"] for r in runs)
    if reused:
        res.add(f"{reused} of the {len(runs)} runs finished in earlier invocations into this folder, with the same "
                f"resolved config, and were read back; the minutes per run are each run's own.")
    print(f"results in {res.write()}")


if __name__ == "__main__":
    main()
