"""Online against offline DPO (OAIF paper §4): does feedback on the current policy's own
samples beat the same amount of feedback collected once, on the starting policy's samples?

    .venv/bin/python scripts/experiments/online_offline.py [--config CONFIG] [--seeds 0,1,2,3,4] [--out DIR] [key=value ...]

Three trained arms per seed, the same config, annotator, prompts per round and optimizer steps:
  online             the loop (`oaif.Loop`): each round's pairs are sampled from the policy of that round;
  offline            the same prompts, in the same rounds, with every pair sampled from the
                     starting policy before training (as many annotated pairs as online);
  offline, repeated  round 0's pairs alone, trained on in every round (one fixed set, many passes).
Each offline arm is also reported early-stopped: at the round where its validation win rate
peaks, per seed, among rounds whose answers stay well-formed (no training of its own). Round
0 samples the same pairs in every arm.

Three prompt splits that share no prompt (the tiny config's share no system instruction
either; its comment lists them): training (`prompts`), tuning (--tuning-prompts) and held-out
(`eval.prompts`). First each arm's
learning rate is chosen from --grid on the tuning split with the --tune-seeds: the highest
validation win rate after the last round, averaged over those seeds, among the rates whose
answers stay well-formed (share >= --floor; without it a judge that counts words is pleased by
broken text); tuning.json keeps every run's numbers and the choice (--tuned FILE: the runs of
an earlier one are not redone, so a wider --grid runs only its new rates).
Then the reported --seeds run with the chosen rates. After every evaluated round (eval.every)
each policy answers the held-out and the tuning prompts, judged in both orders against the start's answers by
`eval.annotate`; after the last round online's held-out answers are judged against each other
arm's (head to head). Intervals: 95%, bootstrapped over seeds and then prompts within a seed.

With the default config (configs/experiments/online_offline_tiny.yaml) the training annotator
is a reward model distilled from the evaluation rules: the evaluation judge is not independent
of the training signal (results.md says so beside the numbers). This script builds the reward
model into `annotate.model` when that folder is missing (the starting policy's samples of the
training prompts, every pair of 8 judged by `eval.annotate`, then `oaif train-rm`); every seed
uses that one. Writes results.md, the plots, tuning.json and curves.jsonl (every arm's metrics
per round) into --out; the runs into --out/runs and --out/tuning, the head-to-head verdicts
into --out/head_to_head.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import (RESAMPLES, ROOT, Results, check_model, interval_plot, mean_sd, mean_spread,  # noqa: E402
                     nested_interval, prompt_scores, table, with_interval)

import oaif  # noqa: E402
from oaif.annotate.backends import build_annotator  # noqa: E402
from oaif.annotate.base import close_annotator  # noqa: E402
from oaif.bundled import data_path  # noqa: E402
from oaif.datasets_io import load_prompts  # noqa: E402
from oaif.evaluation import (Evaluator, Response, baseline_responses, compare,  # noqa: E402
                             eval_annotator_config, respond)
from oaif.generate import round_prompts  # noqa: E402
from oaif.records import read_jsonl, write_jsonl  # noqa: E402

ARMS = ("online", "offline", "offline, repeated")
STOPPED = {"offline, early-stopped": "offline", "offline, repeated, early-stopped": "offline, repeated"}
RM_SAMPLES, RM_ROUNDS = 8, 2   # samples per prompt and passes over the prompts for the reward model's data
# The tiny policy's language: capitalised sentences of plain words, each ending in a period.
# Every answer of the starting policy matches it; "A short walk", "....", " for a common
# sight." or "cats.es cats" do not. A judge that counts words can score those as wins.
TINY_SENTENCES = r"[A-Z][a-z]*( [a-z]+)*\.( [A-Z][a-z]*( [a-z]+)*\.)*"


def quiet(line: str) -> None:
    """The runs' own round tables stay in their run.log; this script prints one line per arm."""


def distil_reward_model(cfg: oaif.RunConfig, out: Path) -> dict:
    """The training annotator: a Bradley-Terry model of eval.annotate's preferences, learnt
    from the starting policy's samples of the training prompts (every pair of RM_SAMPLES)."""
    from oaif.pipeline.train_rm import train_reward_model

    judge = eval_annotator_config(cfg).annotate
    data_cfg = dataclasses.replace(
        cfg, name="reward-model-data", overwrite=True, eval=dataclasses.replace(cfg.eval, every=0),
        generate=dataclasses.replace(cfg.generate, samples_per_prompt=RM_SAMPLES),
        annotate=dataclasses.replace(judge, ranking="round_robin", pairs="all"))
    pairs = []
    with oaif.Loop(data_cfg, log=quiet) as loop:
        for r in range(RM_ROUNDS):   # a new seed per pass: other samples of the same prompts
            loop.index = r
            pairs += loop.annotate(loop.generate(loop.prompts)).pairs
        data = loop.run_dir / "pairs.jsonl"
        write_jsonl(data, pairs)
    return train_reward_model(cfg, data, out, log=quiet)


def answers_file(run: Path, r: int) -> Path:
    """The policy's answers to eval.prompts after round r, as the engine gave them (token ids too)."""
    return run / "answers" / f"round_{r:06d}.jsonl"


def eval_file(run: Path, r: int, split: str = "eval") -> Path:
    """The evaluation records of round r: split 'eval' (held-out) or 'validation' (tuning split)."""
    return run / ("eval" if split == "eval" else "validation/eval") / f"round_{r:06d}.jsonl"


def well_formed_share(records: list[dict], pattern: re.Pattern, side: str) -> float:
    """The share of one side's ('policy' or 'baseline') answers that match pattern whole."""
    return sum(bool(pattern.fullmatch(r[side])) for r in records) / len(records)


def validation_evaluator(loop: oaif.Loop, prompts: str) -> Evaluator:
    """The tuning split's evaluation, beside the loop's own: the start's answers now (before
    round 0 the engine holds the starting policy), the same judge, records in validation/."""
    cfg = dataclasses.replace(loop.cfg, eval=dataclasses.replace(loop.cfg.eval, prompts=prompts))
    where = loop.run_dir / "validation"
    return Evaluator(cfg, where, loop.evaluator.annotator,
                     baseline_responses(cfg, where, loop.generator.engine, loop.tokenizer, fresh=True))


def after_round(loop: oaif.Loop, r: int, validation: Evaluator | None, pattern: re.Pattern | None) -> dict:
    """What the loop's evaluation does not keep: the held-out answers themselves (for the head
    to head), the tuning split's win rate and both splits' well-formed shares."""
    engine = loop.generator.engine
    write_jsonl(answers_file(loop.run_dir, r), respond(engine, loop.tokenizer, loop.evaluator.prompts, loop.cfg))
    extra = {"well_formed": well_formed_share(read_jsonl(eval_file(loop.run_dir, r)), pattern, "policy")} \
        if pattern else {}
    if validation is not None:
        m = validation(engine, loop.tokenizer, loop.trainer, r, loop.policy_version)
        extra["validation/win_rate"] = m["eval/win_rate_vs_ref"]
        if pattern:
            extra["validation/well_formed"] = well_formed_share(
                read_jsonl(eval_file(loop.run_dir, r, "validation")), pattern, "policy")
    return extra


def online(cfg: oaif.RunConfig, validate: str | None, pattern: re.Pattern | None) -> list[dict]:
    rows = []
    with oaif.Loop(cfg, log=quiet) as loop:
        validation = validation_evaluator(loop, validate) if validate else None
        for m in loop.rounds():
            evaluated = "eval/win_rate_vs_ref" in m   # every eval.every rounds, and the last
            rows.append(m | {"pairs_annotated": m["pairs_kept"]} |
                        (after_round(loop, m["round"], validation, pattern) if evaluated else {}))
    return rows


def offline(cfg: oaif.RunConfig, repeated: bool, validate: str | None, pattern: re.Pattern | None) -> list[dict]:
    """The offline arms, from the loop's own stages: every pair is sampled and judged first,
    from the starting policy; then one round of training (and an evaluation) per chunk."""
    rows = []
    with oaif.Loop(cfg, log=quiet) as loop:
        validation = validation_evaluator(loop, validate) if validate else None
        batches = round_prompts(loop.prompts, cfg.prompts_per_round, cfg.seed)   # online's prompts, round by round
        chunks = []
        for r in range(1 if repeated else cfg.rounds):
            loop.index = r   # samples seeded as online's round r: round 0 is identical
            chunks.append(loop.annotate(loop.generate(next(batches))).pairs)
        for r in range(cfg.rounds):
            loop.index, loop.metrics = r, {}
            pairs = chunks[0 if repeated else r]
            loop.train(pairs)
            loop.sync()
            annotated = len(pairs) if r == 0 or not repeated else 0
            rows.append({"round": r, "pairs_kept": len(pairs), "pairs_annotated": annotated, **loop.metrics,
                         **(loop.evaluate(r) | after_round(loop, r, validation, pattern)
                            if loop.evaluator.due(r) else {})})
    return rows


def run_arm(cfg: oaif.RunConfig, arm: str, seed: int, lr: float, where: Path, validate: str | None,
            pattern: re.Pattern | None) -> list[dict]:
    """One arm's run at learning rate lr, in where/NAME; its metrics per round."""
    name = arm.replace(", ", "-") + f"-lr{lr:g}-seed{seed}"
    arm_cfg = dataclasses.replace(cfg, seed=seed, name=name, overwrite=True, output_dir=str(where),
                                  train=dataclasses.replace(cfg.train, learning_rate=lr))
    rows = online(arm_cfg, validate, pattern) if arm == "online" else \
        offline(arm_cfg, arm == "offline, repeated", validate, pattern)
    return [{"arm": arm, "seed": seed, "lr": lr, "run": str(where / name), **r} for r in rows]


def steps(rows: list[dict], cfg: oaif.RunConfig) -> int:
    return sum(cfg.train.epochs_per_round * math.ceil(r["pairs_kept"] / cfg.train.batch_size) for r in rows)


def choose_lr(rows: list[dict], floor: float) -> float:
    """The learning rate with the highest mean validation win rate over the tuning seeds, among
    those whose mean well-formed share is at least floor (a row without one passes); if none
    is, the one with the most well-formed answers. A tie goes to the smaller rate."""
    by_lr = {lr: [r for r in rows if r["lr"] == lr] for lr in sorted({r["lr"] for r in rows})}
    mean = lambda rs, key: statistics.fmean(r[key] for r in rs)  # noqa: E731
    formed = {lr: None if rs[0]["well_formed"] is None else mean(rs, "well_formed") for lr, rs in by_lr.items()}
    kept = [lr for lr in by_lr if formed[lr] is None or formed[lr] >= floor]
    if not kept:
        return max(by_lr, key=lambda lr: (formed[lr], -lr))
    return max(kept, key=lambda lr: (mean(by_lr[lr], "win_rate"), -lr))


def tune(cfg: oaif.RunConfig, args, pattern: re.Pattern | None, done: dict | None) -> dict:
    """Every arm at every rate of the grid, each tuning seed, evaluated on the tuning split only
    (the held-out prompts stay unseen); the rate each arm keeps (choose_lr) among these and the
    runs of `done` (an earlier tuning.json: a grid widened later runs only its new rates)."""
    if done and (done["prompts"], done["seeds"]) != (args.tuning_prompts, args.tune_seeds):
        raise SystemExit(f"--tuned: its tuning prompts and seeds ({done['prompts']}, {done['seeds']}) are not these")
    tune_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, prompts=args.tuning_prompts))
    rows = list(done["runs"]) if done else []
    have = {(r["arm"], r["lr"], r["seed"]) for r in rows}
    stored = len(rows)
    for arm in ARMS:
        for lr in args.grid:
            for seed in [s for s in args.tune_seeds if (arm, lr, s) not in have]:
                last = run_arm(tune_cfg, arm, seed, lr, args.out / "tuning", None, pattern)[-1]
                rows.append({"arm": arm, "lr": lr, "seed": seed, "win_rate": last["eval/win_rate_vs_ref"],
                             "well_formed": last.get("well_formed"), "kl_to_ref": last["eval/kl_to_ref"]})
                print(f"tuning {arm} lr {lr:g} seed {seed}: validation win rate {rows[-1]['win_rate']:.3f}",
                      flush=True)
    command = " ".join([".venv/bin/python", "scripts/experiments/online_offline.py", *sys.argv[1:]])
    return {"prompts": args.tuning_prompts, "seeds": args.tune_seeds, "floor": args.floor,
            "grid": sorted({r["lr"] for r in rows}),
            "commands": (done["commands"] if done else []) + ([command] if len(rows) > stored else []),
            "runs": rows, "chosen": {arm: choose_lr([r for r in rows if r["arm"] == arm], args.floor) for arm in ARMS}}


def early_stopped(curves: list[dict], floor: float) -> list[dict]:
    """Each offline arm's row, per seed, at the round its validation win rate peaks (the first
    such round), as the arm 'ARM, early-stopped'; as in tuning, only rounds whose validation
    answers are at least `floor` well-formed count (all of them if none is)."""
    rows = []
    for label, arm in STOPPED.items():
        for seed in sorted({c["seed"] for c in curves}):
            mine = [c for c in curves if c["arm"] == arm and c["seed"] == seed and "validation/win_rate" in c]
            sound = [c for c in mine if c.get("validation/well_formed", 1.0) >= floor] or mine
            rows.append(max(sound, key=lambda c: (c["validation/win_rate"], -c["round"])) | {"arm": label})
    return rows


def head_to_head(cfg: oaif.RunConfig, online: list[dict], others: dict[str, list[dict]], out: Path
                 ) -> dict[str, list[list[float]]]:
    """Online's held-out answers after the last round (its rows, one per seed) against each other
    arm's at its end row, judged in both orders by the evaluation judge; per arm and seed,
    online's scores."""
    judge = eval_annotator_config(cfg)
    annotator = build_annotator(judge)
    load = lambda row: [Response(**a) for a in read_jsonl(answers_file(Path(row["run"]), row["round"]))]  # noqa: E731
    result = {}
    try:
        for arm, rows in others.items():
            result[arm] = []
            for mine, theirs in zip(online, rows):
                records, _ = compare(annotator, load(mine), load(theirs), None, mine["round"], 0,
                                     judge.annotate.missing_eos_penalty, judge.annotate.min_label_mass)
                write_jsonl(out / "head_to_head" / f"{arm.replace(', ', '-')}-seed{mine['seed']}.jsonl", records)
                result[arm].append(list(prompt_scores(records).values()))
    finally:
        close_annotator(annotator)
    return result


def setup_section(cfg: oaif.RunConfig, tuning: dict, seeds: list[int], baseline: list[float], rm: dict | None) -> str:
    judge = eval_annotator_config(cfg).annotate
    text = (
        f"Policy `{cfg.policy.model}` ({cfg.rounds} rounds × {cfg.prompts_per_round} prompts × "
        f"{cfg.generate.samples_per_prompt} samples, loss {cfg.train.loss}, {cfg.train.epochs_per_round} epochs per "
        f"round, threads {cfg.threads}); training annotator `{cfg.annotate.backend}` "
        f"(`{cfg.annotate.model or cfg.annotate.constitution}`), evaluation annotator `{judge.backend}` "
        f"(`{judge.constitution}`). Prompts: training `{cfg.prompts}`, tuning `{tuning['prompts']}`, held-out "
        f"`{cfg.eval.prompts}`, no prompt in two of them. Greedy answers judged in both orders against the starting "
        f"policy's ({mean_sd(baseline, '.1f')} tokens). Reported seeds {', '.join(map(str, seeds))}. Brackets: 95% "
        f"interval, {RESAMPLES} bootstrap resamples of the seeds, then of the prompts within each seed.")
    if rm:
        text += (
            f"\n\n**The evaluation judge is not independent of the training signal.** The training annotator is a "
            f"reward model distilled from the evaluation rules (`{judge.constitution}`) on the starting policy's "
            f"samples of the training prompts: held-out accuracy {rm['heldout_accuracy']:.3f} on {rm['heldout_pairs']} pairs "
            f"(train {rm['train_accuracy']:.3f}); every seed uses this one reward model. What the held-out split adds: "
            f"no training prompt has its system instructions, and half of them ask for a limit or a word no training "
            f"prompt states (by category below). A win there is behaviour the rules reward carried to instructions "
            f"training never showed, graded by the rules the reward model imitates: not a second opinion.")
    return text


def tuning_section(tuning: dict, pattern: re.Pattern | None) -> str:
    def cell(arm: str, lr: float) -> str:
        runs = [r for r in tuning["runs"] if r["arm"] == arm and r["lr"] == lr]
        formed = "" if pattern is None else f" ({mean_sd([r['well_formed'] for r in runs], '.2f')})"
        return mean_sd([r["win_rate"] for r in runs]) + formed

    return (f"Learning rates, chosen before any held-out answer was judged: each arm at "
            f"{', '.join(f'{lr:g}' for lr in tuning['grid'])}, tuning seeds {', '.join(map(str, tuning['seeds']))}, "
            f"evaluated on the tuning split after the last round; kept: the highest validation win rate among the "
            f"rates whose well-formed share is at least {tuning['floor']} ("
            f"{'; '.join(f'`{c}`' for c in tuning['commands'])}). Validation win "
            f"rate vs start, mean ± sd over the tuning seeds" + (" (well-formed share)" if pattern else "") + ":\n\n" +
            table(["arm", *[f"lr {lr:g}" for lr in tuning["grid"]], "chosen"],
                  [[arm, *[cell(arm, lr) for lr in tuning["grid"]], f"{tuning['chosen'][arm]:g}"] for arm in ARMS]))


def report(results: Results, cfg: oaif.RunConfig, curves: list[dict], tuning: dict, seeds: list[int],
           rm: dict | None, pattern: re.Pattern | None, categories: dict[str, str], by_hand: dict[str, float]
           ) -> None:
    last = [c for c in curves if c["round"] == cfg.rounds - 1]
    ends = {arm: [c for c in last if c["arm"] == arm] for arm in ARMS} | \
        {arm: [c for c in early_stopped(curves, tuning["floor"]) if c["arm"] == arm] for arm in STOPPED}
    order = ["online", "offline", "offline, early-stopped", "offline, repeated", "offline, repeated, early-stopped"]
    records = lambda row: read_jsonl(eval_file(Path(row["run"]), row["round"]))  # noqa: E731
    vs_start = {arm: [prompt_scores(records(row)) for row in ends[arm]] for arm in order}   # per seed, per prompt
    h2h = head_to_head(cfg, ends["online"], {arm: ends[arm] for arm in order[1:]}, results.out)
    kl = {arm: [[r["kl_to_ref"] for r in records(row)] for row in ends[arm]] for arm in order}
    values = lambda per_seed: [list(by_prompt.values()) for by_prompt in per_seed]  # noqa: E731
    # Paired by seed and prompt: the same held-out prompt, each arm's answer against the same start answer.
    diff = {arm: [[on[p] - theirs[p] for p in on if p in theirs]
                  for on, theirs in zip(vs_start["online"], vs_start[arm])] for arm in order[1:]}

    results.add(setup_section(cfg, tuning, seeds, [c["eval/baseline_mean_length"] for c in ends["online"]], rm))
    results.add(tuning_section(tuning, pattern))
    if by_hand:
        results.add(f"**Rates set by hand, not tuned** (`--lr`), over the choice above: "
                    f"{', '.join(f'{arm} {lr:g}' for arm, lr in by_hand.items())}. A check of the choice, not a "
                    f"result of the procedure.")
    rows = []
    for arm in order:
        e = ends[arm]   # trained until the row's round: the early-stopped arms' pairs and steps stop there
        upto = [[r for r in curves if r["arm"] == STOPPED.get(arm, arm) and r["seed"] == c["seed"]
                 and r["round"] <= c["round"]] for c in e]
        rows.append([arm, f"{e[0]['lr']:g}", "-" if arm == "online" else with_interval(h2h[arm]),
                     with_interval(values(vs_start[arm])), " ".join(f"{c['eval/win_rate_vs_ref']:.2f}" for c in e),
                     mean_sd([c.get("eval/train_judge_win_rate") for c in e]), with_interval(kl[arm], ".2f"),
                     mean_sd([c["eval/mean_length"] for c in e], ".1f"),
                     *([mean_sd([c["well_formed"] for c in e], ".2f")] if pattern else []),
                     " ".join(str(c["round"]) for c in e),
                     mean_sd([sum(r["pairs_annotated"] for r in rs) for rs in upto], ".0f"),
                     mean_sd([steps(rs, cfg) for rs in upto], ".0f")])
    results.add(
        "Held-out, after the last round (early-stopped: at the round of the peak validation win rate). Head to head: "
        "online's answers after the last round against the arm's, judged in both orders by the evaluation judge "
        "(win 1, tie 0.5; above 0.5: online better). RM: the training reward model's win rate vs start on the same "
        "pairs.\n\n" + table(
            ["arm", "lr", "online vs arm, head to head", "win rate vs start", "per seed", "RM's win rate vs start",
             "KL to start (nats)", "length (tokens)", *(["well-formed"] if pattern else []), "round per seed",
             "annotated pairs", "optimizer steps"], rows))
    share = lambda groups, score: 100 * statistics.fmean(v == score for g in groups for v in g)  # noqa: E731
    results.add("Head to head, online's held-out answers after the last round against each arm's (as the OAIF "
                "paper's Table 2: win / tie / loss):\n\n" + table(
                    ["online vs", "win rate [95%]", "win / tie / loss %", "per seed", "seeds above 0.5"],
                    [[arm, with_interval(g), " / ".join(f"{share(g, s):.0f}" for s in (1.0, 0.5, 0.0)),
                      " ".join(f"{statistics.fmean(s):.2f}" for s in g),
                      f"{sum(statistics.fmean(s) > 0.5 for s in g)} of {len(g)}"] for arm, g in h2h.items()]))
    if pattern:
        start = [well_formed_share(records(c), pattern, "baseline") for c in ends["online"]]
        results.add(f"Well-formed: the answer matches `{pattern.pattern}` whole (the starting policy's answers: "
                    f"{mean_sd(start, '.2f')}). The evaluation judge does not check it.")
    results.add("Online minus each arm, win rate vs start, paired by seed and prompt:\n\n" + table(
        ["online minus", "mean [95%]", "per seed", "seeds where online is higher"],
        [[arm, with_interval(d), " ".join(f"{statistics.fmean(s):+.3f}" for s in d),
          f"{sum(statistics.fmean(s) > 0 for s in d)} of {len(d)}"] for arm, d in diff.items()]))
    kinds = sorted(set(categories.values()))
    if kinds:
        results.add("Win rate vs start by the held-out prompt's category (seen value: a limit or word training "
                    "states, in a new wording; new value: one it never states):\n\n" + table(
                        ["arm", *kinds], [[arm, *[with_interval([[v for p, v in seed.items() if categories.get(p) == k]
                                                                 for seed in vs_start[arm]]) for k in kinds]]
                                          for arm in order]))

    plot_curves(results, curves, pattern)
    dots = lambda groups: (groups, *nested_interval(groups, RESAMPLES))  # noqa: E731
    title = "After the last round: seeds (dots), mean, 95% interval"
    interval_plot(results.out / "final.png", title, [
        ("win rate vs start", {arm: dots(values(vs_start[arm])) for arm in order}, 0.5, False),
        ("KL to start (nats, log scale)", {arm: dots(kl[arm]) for arm in order}, None, True),
        ("online minus arm, win rate vs start", {arm: dots(d) for arm, d in diff.items()}, 0.0, False),
        ("online vs arm, head to head", {arm: dots(h2h[arm]) for arm in order[1:]}, 0.5, False)])
    results.add(f"![{title}](final.png)")
    results.add(samples_section(ends, cfg.rounds))


def plot_curves(results: Results, curves: list[dict], pattern: re.Pattern | None) -> None:
    """The trained arms' evaluated rounds: win rates with their 95% intervals, length and
    well-formed share with the range over seeds."""
    x = sorted({c["round"] for c in curves if "validation/win_rate" in c})
    at = lambda arm, r: [c for c in curves if c["arm"] == arm and c["round"] == r]  # noqa: E731
    mean = lambda arm, key: [mean_spread([c[key] for c in at(arm, r)])[0] for r in x]  # noqa: E731

    def win_rate(arm: str, key: str, split: str) -> tuple:
        intervals = [nested_interval([list(prompt_scores(read_jsonl(eval_file(Path(c["run"]), r, split))).values())
                                      for c in at(arm, r)], RESAMPLES) for r in x]
        return x, mean(arm, key), [lo for lo, _ in intervals], [hi for _, hi in intervals]

    def spread(arm: str, key: str) -> tuple:
        return x, mean(arm, key), *[[f(c[key] for c in at(arm, r)) for r in x] for f in (min, max)]

    results.plot("win_rate.png", "Win rate vs the start (band: 95% interval)", "round", [
        (f"{name} win rate", {arm: win_rate(arm, key, split) for arm in ARMS})
        for name, key, split in (("held-out", "eval/win_rate_vs_ref", "eval"),
                                 ("validation", "validation/win_rate", "validation"))], reference=0.5)
    results.plot("length.png", "Length and well-formed answers (band: seed range)", "round",
                 [("held-out tokens", {arm: spread(arm, "eval/mean_length") for arm in ARMS}),
                  *([("well-formed share", {arm: spread(arm, "well_formed") for arm in ARMS})] if pattern else [])])


def samples_section(ends: dict[str, list[dict]], rounds: int) -> str:
    """The first held-out answers of each trained arm's last evaluation next to the start's, to be read."""
    last = {arm: read_jsonl(eval_file(Path(ends[arm][0]["run"]), rounds - 1)) for arm in ARMS}
    lines = [f"Held-out answers after round {rounds - 1} (seed {ends['online'][0]['seed']}; outcome by the "
             f"evaluation judge):", ""]
    for k, start in enumerate(last["online"][:6]):
        system = start["messages"][0]["content"] if start["messages"][0]["role"] == "system" else ""
        lines.append(f"- *{system}* **{start['messages'][-1]['content']}** start: \"{start['baseline']}\"")
        lines += [f"  - {arm} ({last[arm][k]['outcome']}): \"{last[arm][k]['policy']}\"" for arm in ARMS]
    return "\n".join(lines)


def conversations(path: str) -> set:
    return {tuple((m["role"], m["content"]) for m in p.messages) for p in load_prompts(path)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="key=value, as for oaif run (e.g. rounds=4)")
    ap.add_argument("--config", default=str(ROOT / "configs/experiments/online_offline_tiny.yaml"))
    ap.add_argument("--seeds", default="0,1,2,3,4", help="the reported seeds")
    ap.add_argument("--out", type=Path, default=Path("runs/experiments/online_offline"))
    ap.add_argument("--tuning-prompts", default="prompts/system_prompts_tuning.jsonl",
                    help="the tuning split: learning rates and early stopping are chosen on it")
    ap.add_argument("--tune-seeds", default="100,101", help="seeds of the tuning runs, none of them reported")
    ap.add_argument("--grid", default="5e-5,1e-4,2e-4", help="learning rates tried for each arm")
    ap.add_argument("--floor", type=float, default=0.9,
                    help="a learning rate is kept only if this share of its tuning answers is well-formed")
    ap.add_argument("--tuned", type=Path, help="a tuning.json of an earlier invocation: its runs are kept, not redone")
    ap.add_argument("--lr", action="append", default=[], metavar="ARM=RATE",
                    help="set an arm's rate by hand over the tuned one (a check of the choice; results.md says so)")
    ap.add_argument("--well-formed", default=TINY_SENTENCES,
                    help="a regex a sound answer matches whole (default: the tiny policy's sentences; '' for none)")
    args = ap.parse_args(argv)
    cfg = oaif.load_config(args.config, [f"output_dir={args.out / 'runs'}", *args.overrides])
    check_model(cfg.policy.model, "policy.model")
    if cfg.eval.every < 1:
        raise SystemExit("eval.every must be >= 1: the arms are compared, and stopped early, on their evaluations")
    split = conversations(args.tuning_prompts)
    if split & conversations(cfg.prompts) or split & conversations(cfg.eval.prompts):
        raise SystemExit(f"--tuning-prompts {args.tuning_prompts} shares a prompt with `prompts` or `eval.prompts`")
    seeds = [int(s) for s in args.seeds.split(",")]
    by_hand = {arm: float(rate) for arm, _, rate in (item.rpartition("=") for item in args.lr)}
    if set(by_hand) - set(ARMS):
        raise SystemExit(f"--lr: arms are {', '.join(ARMS)}; got {', '.join(set(by_hand) - set(ARMS))}")
    args.tune_seeds = [int(s) for s in args.tune_seeds.split(",")]
    args.grid = [float(lr) for lr in args.grid.split(",")]
    pattern = re.compile(args.well_formed) if args.well_formed else None
    results = Results(args.out, "Online against offline DPO")
    (args.out / "curves.jsonl").unlink(missing_ok=True)
    rm = None
    if cfg.annotate.backend == "reward_model" and not Path(cfg.annotate.model).exists():
        print(f"distilling the training annotator into {cfg.annotate.model} ...", flush=True)
        rm = distil_reward_model(cfg, Path(cfg.annotate.model))
    elif cfg.annotate.backend == "reward_model":
        rm = json.loads((Path(cfg.annotate.model) / "metrics.json").read_text())
    tuning = tune(cfg, args, pattern, json.loads(args.tuned.read_text()) if args.tuned else None)
    (args.out / "tuning.json").write_text(json.dumps(tuning, indent=1) + "\n")
    curves = []
    for seed in seeds:
        for arm in ARMS:
            lr = by_hand.get(arm, tuning["chosen"][arm])
            rows = run_arm(cfg, arm, seed, lr, args.out / "runs", args.tuning_prompts, pattern)
            end = rows[-1]
            print(f"{arm} seed {seed} (lr {end['lr']:g}): win rate {end['eval/win_rate_vs_ref']:.3f}, "
                  f"validation {end['validation/win_rate']:.3f}, KL {end['eval/kl_to_ref']:.2f}", flush=True)
            curves += rows
            with open(args.out / "curves.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    held_out = data_path(cfg.eval.prompts)
    categories = {r["id"]: r["category"] for r in read_jsonl(held_out) if "category" in r} \
        if held_out.suffix == ".jsonl" else {}
    report(results, cfg, curves, tuning, seeds, rm, pattern, categories, by_hand)
    print(f"results in {results.write()}")


if __name__ == "__main__":
    main()
