"""Online against offline DPO (OAIF paper §4): does feedback on the current policy's own
samples beat the same amount of feedback collected once, on the starting policy's samples?

    .venv/bin/python scripts/experiments/online_offline.py [--config CONFIG] [--seeds 0,1,2] [--out DIR] [key=value ...]

Three arms per seed, the same config, annotator, prompts per round and optimizer steps:
  online             the loop (`oaif.run`): each round's pairs are sampled from the policy of that round;
  offline            the same prompts, in the same rounds, with every pair sampled from the
                     starting policy before training (as many annotated pairs as online);
  offline, repeated  round 0's pairs alone, trained on in every round (the usual offline
                     baseline: one fixed set, many passes; fewer annotated pairs).
Round 0 is the same in all three (same policy, same seeds). After every round each policy
answers the held-out prompts and `eval.annotate` (a judge no arm was trained with) compares
the answers with the start's in both orders: win rate, KL to the reference, lengths.

With the default config (configs/experiments/online_offline_tiny.yaml) the training
annotator is a reward model distilled from the system-prompt rules; this script builds it
into `annotate.model` when that folder is missing (the starting policy's samples of the
training prompts, every pair of 8 judged by `eval.annotate`, then `oaif train-rm`).
Writes results.md, the plots and curves.jsonl (every arm's metrics per round) into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import ROOT, Results, check_model, mean_sd, mean_spread, table  # noqa: E402

import oaif  # noqa: E402
from oaif.evaluation import eval_annotator_config  # noqa: E402
from oaif.generate import round_prompts  # noqa: E402
from oaif.records import read_jsonl, write_jsonl  # noqa: E402

ARMS = ("online", "offline", "offline, repeated")
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


def online(cfg: oaif.RunConfig) -> list[dict]:
    return [r | {"pairs_annotated": r["pairs_kept"]} for r in read_jsonl(oaif.run(cfg, log=quiet) / "metrics.jsonl")]


def offline(cfg: oaif.RunConfig, repeated: bool) -> list[dict]:
    """The offline arms, from the loop's own stages: every pair is sampled and judged first,
    from the starting policy; then one round of training (and an evaluation) per chunk."""
    rows = []
    with oaif.Loop(cfg, log=quiet) as loop:
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
                         **loop.evaluate(r)})
    return rows


def steps(rows: list[dict], cfg: oaif.RunConfig) -> int:
    return sum(cfg.train.epochs_per_round * math.ceil(r["pairs_kept"] / cfg.train.batch_size) for r in rows)


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / (arm.replace(", ", "-") + f"-seed{seed}")


def well_formed_share(eval_file: Path, pattern: re.Pattern, side: str) -> float:
    """The share of one side's ('policy' or 'baseline') held-out answers that match pattern whole."""
    records = read_jsonl(eval_file)
    return sum(bool(pattern.fullmatch(r[side])) for r in records) / len(records)


def run_arms(cfg: oaif.RunConfig, seeds: list[int], out: Path, pattern: re.Pattern | None) -> list[dict]:
    """One line per (arm, seed, round) with its metrics, appended to curves.jsonl as each arm ends."""
    curves = []
    for seed in seeds:
        for arm in ARMS:
            arm_dir = run_dir(out, arm, seed)
            arm_cfg = dataclasses.replace(cfg, seed=seed, name=arm_dir.name, overwrite=True, output_dir=str(arm_dir.parent))
            rows = online(arm_cfg) if arm == "online" else offline(arm_cfg, repeated=arm != "offline")
            for r in rows if pattern else ():
                r["well_formed"] = well_formed_share(arm_dir / "eval" / f"round_{r['round']:06d}.jsonl", pattern, "policy")
            last = rows[-1]
            formed = "-" if last.get("well_formed") is None else f"{last['well_formed']:.2f}"
            print(f"{arm} seed {seed}: win rate {last['eval/win_rate_vs_ref']:.3f}, KL {last['eval/kl_to_ref']:.2f}, "
                  f"held-out length {last['eval/mean_length']:.1f}, well-formed {formed}, "
                  f"{sum(r['pairs_annotated'] for r in rows)} pairs annotated, {steps(rows, cfg)} steps", flush=True)
            curves += [{"arm": arm, "seed": seed, **r} for r in rows]
            with open(out / "curves.jsonl", "a") as f:
                f.writelines(json.dumps({"arm": arm, "seed": seed, **r}) + "\n" for r in rows)
    return curves


def by_arm(curves: list[dict], arm: str, key: str, rounds: int) -> list[list[float | None]]:
    """[round][seed] values of key for the arm."""
    return [[c.get(key) for c in curves if c["arm"] == arm and c["round"] == r] for r in range(rounds)]


def band(curves: list[dict], arm: str, key: str, rounds: int) -> tuple:
    """(x, mean, min, max) over seeds, per round (a range, not mean ± sd: KL is heavy-tailed)."""
    per_round = [[v for v in vs if v is not None] for vs in by_arm(curves, arm, key, rounds)]
    return (list(range(rounds)), [mean_spread(v)[0] for v in per_round],
            [min(v, default=None) for v in per_round], [max(v, default=None) for v in per_round])


def samples_section(out: Path, seed: int, rounds: int) -> str:
    """The first held-out answers of each arm's last evaluation next to the start's, to be read."""
    last = {arm: read_jsonl(run_dir(out, arm, seed) / "eval" / f"round_{rounds - 1:06d}.jsonl") for arm in ARMS}
    lines = [f"Held-out answers after round {rounds - 1} (seed {seed}; outcome by the evaluation judge):", ""]
    for k, start in enumerate(last["online"][:6]):
        system = start["messages"][0]["content"] if start["messages"][0]["role"] == "system" else ""
        lines.append(f"- *{system}* **{start['messages'][-1]['content']}** start: \"{start['baseline']}\"")
        lines += [f"  - {arm} ({last[arm][k]['outcome']}): \"{last[arm][k]['policy']}\"" for arm in ARMS]
    return "\n".join(lines)


def report(results: Results, cfg: oaif.RunConfig, curves: list[dict], seeds: list[int], rm: dict | None,
           pattern: re.Pattern | None) -> None:
    rounds, out = cfg.rounds, results.out
    final = lambda arm, key: [c.get(key) for c in curves if c["arm"] == arm and c["round"] == rounds - 1]  # noqa: E731
    per_seed = lambda arm, f: [f([c for c in curves if c["arm"] == arm and c["seed"] == s]) for s in seeds]  # noqa: E731
    judge = eval_annotator_config(cfg).annotate
    baseline = final("online", "eval/baseline_mean_length")
    results.add(
        f"Policy `{cfg.policy.model}`, prompts `{cfg.prompts}` ({rounds} rounds × {cfg.prompts_per_round} prompts × "
        f"{cfg.generate.samples_per_prompt} samples, loss {cfg.train.loss}, lr {cfg.train.learning_rate}, "
        f"{cfg.train.epochs_per_round} epochs per round); training annotator `{cfg.annotate.backend}` "
        f"(`{cfg.annotate.model or cfg.annotate.constitution}`); evaluation annotator `{judge.backend}` "
        f"(`{judge.constitution}`) on `{cfg.eval.prompts}`, greedy answers judged in both orders against the "
        f"starting policy's ({mean_sd(baseline, '.1f')} tokens). Seeds {', '.join(map(str, seeds))}; "
        f"mean ± sd over seeds.")
    if rm:
        results.add(f"The reward model: held-out accuracy {rm['heldout_accuracy']:.3f} on {rm['heldout_pairs']} pairs "
                    f"of the starting policy's samples (train {rm['train_accuracy']:.3f}).")
    formed = [] if pattern is None else ["well-formed answers"]
    rows = []
    for arm in ARMS:
        rows.append([arm, mean_sd(final(arm, "eval/win_rate_vs_ref")), mean_sd(final(arm, "eval/lc_win_rate_vs_ref")),
                     mean_sd(final(arm, "eval/kl_to_ref"), ".2f"), mean_sd(final(arm, "eval/mean_length"), ".1f"),
                     *([mean_sd(final(arm, "well_formed"), ".2f")] if pattern else []),
                     " ".join(f"{v:.2f}" for v in final(arm, "eval/win_rate_vs_ref")),
                     mean_sd(per_seed(arm, lambda rs: sum(r["pairs_annotated"] for r in rs)), ".0f"),
                     mean_sd(per_seed(arm, lambda rs: steps(rs, cfg)), ".0f")])
    results.add(f"After round {rounds - 1}:\n\n" + table(
        ["arm", "win rate vs start", "LC win rate", "KL to start (nats)", "held-out length", *formed,
         "win rate per seed", "annotated pairs", "optimizer steps"], rows))
    if pattern:
        start = [well_formed_share(run_dir(out, "online", s) / "eval" / f"round_{rounds - 1:06d}.jsonl", pattern,
                                   "baseline") for s in seeds]
        results.add(f"Well-formed: the answer matches `{pattern.pattern}` whole (the starting policy's answers: "
                    f"{mean_sd(start, '.2f')}). The evaluation judge does not check it.")
    # Paired by seed: round 0 is the same in every arm, so the seeds pair the arms up.
    diff = lambda a, b, key: [x - y for x, y in zip(final(a, key), final(b, key))]  # noqa: E731
    keys = [("eval/win_rate_vs_ref", "win rate", ".3f"), ("eval/kl_to_ref", "KL", ".2f")] + \
        ([("well_formed", "well-formed", ".2f")] if pattern else [])
    results.add("Online minus each offline arm, seed by seed (after the last round):\n\n" + table(
        ["online minus", *[f"{label}: mean ± sd (per seed)" for _, label, _ in keys], "seeds where online wins more"],
        [[arm, *[f"{mean_sd(diff('online', arm, k), spec)} ({' '.join(format(v, '+' + spec) for v in diff('online', arm, k))})"
                 for k, _, spec in keys],
          f"{sum(v > 0 for v in diff('online', arm, 'eval/win_rate_vs_ref'))} of {len(seeds)}"] for arm in ARMS[1:]]))
    results.plot("win_rate.png", "Held-out win rate against the start (mean; band: range over seeds)", "round",
                 [("win rate", {arm: band(curves, arm, "eval/win_rate_vs_ref", rounds) for arm in ARMS})], reference=0.5)
    results.plot("kl_length.png", "KL to the start, length and well-formed answers (mean; band: range over seeds)",
                 "round", [("KL (nats)", {arm: band(curves, arm, "eval/kl_to_ref", rounds) for arm in ARMS}),
                           ("tokens", {arm: band(curves, arm, "eval/mean_length", rounds) for arm in ARMS}),
                           *([("well-formed share", {arm: band(curves, arm, "well_formed", rounds) for arm in ARMS})]
                             if pattern else [])])
    results.add(samples_section(out, seeds[0], rounds))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="key=value, as for oaif run (e.g. rounds=4)")
    ap.add_argument("--config", default=str(ROOT / "configs/experiments/online_offline_tiny.yaml"))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", default="runs/experiments/online_offline")
    ap.add_argument("--well-formed", default=TINY_SENTENCES,
                    help="a regex a sound answer matches whole (default: the tiny policy's sentences; '' for none)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    cfg = oaif.load_config(args.config, [f"output_dir={out / 'runs'}", *args.overrides])
    check_model(cfg.policy.model, "policy.model")
    seeds = [int(s) for s in args.seeds.split(",")]
    pattern = re.compile(args.well_formed) if args.well_formed else None
    results = Results(out, "Online against offline DPO")
    (out / "curves.jsonl").unlink(missing_ok=True)
    rm = None
    if cfg.annotate.backend == "reward_model" and not Path(cfg.annotate.model).exists():
        print(f"distilling the training annotator into {cfg.annotate.model} ...", flush=True)
        rm = distil_reward_model(cfg, Path(cfg.annotate.model))
    elif cfg.annotate.backend == "reward_model":
        rm = json.loads((Path(cfg.annotate.model) / "metrics.json").read_text())
    curves = run_arms(cfg, seeds, out, pattern)
    report(results, cfg, curves, seeds, rm, pattern)
    print(f"results in {results.write()}")


if __name__ == "__main__":
    main()
