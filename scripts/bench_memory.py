"""Benchmark: the whole loop's peak memory per policy parameter, full weights and LoRA, against
oaif's own estimate (oaif/memory.py, the `check_memory` refusal).

    .venv/bin/python scripts/bench_memory.py       # writes bench/results/memory.{json,md}

Runs scripts/bench.py's oaif run (same prompts and settings, 3 rounds) at two sizes, the 20M
model (hidden 512, 8 layers) and SmolLM2-135M-Instruct, with full weights, with LoRA (r 16
on all seven projections) and with LoRA and train.gradient_checkpointing, in float32 and bfloat16, and records the peak resident memory of
the process tree (sampled every 0.2 s). Two sizes separate the cost per parameter (the slope)
from the fixed cost (the libraries, the KV cache, activations that do not grow with N):
  bytes/param = (peak at 135M - peak at 20M) / (N_135M - N_20M),  fixed = peak - bytes/param·N.
Beside each peak, the estimate the run recorded (startup/memory_estimate_gib: oaif/memory.py's
parts, activations at the longest sequences the config allows) and its ratio to the peak.
Memory does not depend on the CPU's speed, so a busy neighbour does not change these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import PROMPTS, ROOT, fmt, model_for, run_oaif  # noqa: E402
from machine import cpu_model  # noqa: E402

from oaif.memory import parameters, safetensors_shapes  # noqa: E402

SIZES = ("20M", "smollm2-lora")   # bench.py's models; the LoRA mode is set per run below
MODES = {"full": ["train.lora.enabled=false", "train.learning_rate=1e-5"],
         "LoRA": ["train.lora.enabled=true", "train.learning_rate=5e-4"],
         "LoRA, gradient checkpointing": ["train.lora.enabled=true", "train.learning_rate=5e-4",
                                          "train.gradient_checkpointing=true"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(ROOT / "bench/results/memory"), help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="oaif-memory-"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join((ROOT / "prompts/tiny_prompts.jsonl").read_text().splitlines(keepends=True)[:PROMPTS]))
    runs = []
    for dtype in args.dtypes:
        for mode, overrides in MODES.items():
            for size in SIZES:
                model = model_for(size)
                if model is None:
                    continue
                rundir = work / f"{size}-{mode}-{dtype}"
                rundir.mkdir()
                r = run_oaif(size, model, prompts, rundir,
                             argparse.Namespace(steps=args.rounds, oaif=overrides, dtype=dtype))
                estimate = r["rounds"][0].get("startup/memory_estimate_gib")
                runs.append({"size": size, "mode": mode, "dtype": dtype,
                             "parameters": parameters(safetensors_shapes(str(model))),
                             "peak_gib": r["peak_gib"], "estimate_gib": estimate,
                             "others_cpu_share": r["others_cpu_share"]})
                print(f"{size} {mode} {dtype}: peak {r['peak_gib']:.2f} GiB, estimate {fmt(estimate)} GiB", flush=True)
                shutil.rmtree(rundir)
    shutil.rmtree(work)
    machine = {"cpu": cpu_model(), "cpus": os.cpu_count(), "memory_gib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30}
    results = {"machine": machine, "rounds": args.rounds, "runs": runs, "fits": fits(runs)}
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=1))
    Path(f"{args.out}.md").write_text(markdown(results) + "\n")
    print(markdown(results))


def fits(runs: list[dict]) -> list[dict]:
    """Per (mode, dtype): bytes per parameter and the fixed GiB, from its two sizes."""
    out = []
    for key in sorted({(r["mode"], r["dtype"]) for r in runs}):
        small, large = sorted((r for r in runs if (r["mode"], r["dtype"]) == key), key=lambda r: r["parameters"])
        slope = (large["peak_gib"] - small["peak_gib"]) * 2**30 / (large["parameters"] - small["parameters"])
        out.append({"mode": key[0], "dtype": key[1], "bytes_per_parameter": slope,
                    "fixed_gib": small["peak_gib"] - slope * small["parameters"] / 2**30})
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['cpu']} ({m['cpus']} CPUs), {m['memory_gib']:.0f} GiB. oaif run, bench.py's settings, "
             f"{results['rounds']} rounds; peak resident memory of the process tree.", "",
             "| mode | dtype | peak GiB at 20M / 135M | oaif's estimate GiB (÷ peak) | bytes per parameter | fixed GiB |",
             "|---|---|---|---|---|---|"]
    for f in results["fits"]:
        rs = sorted((r for r in results["runs"] if (r["mode"], r["dtype"]) == (f["mode"], f["dtype"])),
                    key=lambda r: r["parameters"])
        peaks = " / ".join(f"{r['peak_gib']:.2f}" for r in rs)
        est = " / ".join(f"{fmt(r['estimate_gib'])} ({fmt(r['estimate_gib'] and r['estimate_gib'] / r['peak_gib'])})"
                         for r in rs)
        lines.append(f"| {f['mode']} | {f['dtype']} | {peaks} | {est} | {f['bytes_per_parameter']:.1f} "
                     f"| {f['fixed_gib']:.2f} |")
    n = {r["size"]: r["parameters"] for r in results["runs"]}
    lines += ["", f"Parameters: {', '.join(f'{k} {v / 1e6:.1f}M' for k, v in n.items())}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
