"""Benchmark: float32 against bfloat16 on this machine's CPU, the facts `policy.dtype: auto` decides by.

    OMP_WAIT_POLICY=ACTIVE .venv/bin/python scripts/bench_dtype.py     # writes bench/results/dtype.{json,md}

Three measurements, each alternating fp32 and bf16, medians of --reps (after a warm-up):
  matmul     a 2048x2048 matmul's GFLOP/s: the raw speed of each precision's kernels.
  train      one optimizer step of oaif's PreferenceTrainer (DPO, AdamW, fp32 master weights)
             on 8 random pairs, in fp32 and under bf16 autocast (what policy.dtype=bfloat16
             does), per policy size: seconds per step.
  loss       the same trainer from the same start, --loss-steps steps on the same pairs in each
             precision: the largest difference between the two loss curves (the tolerance
             tests/test_precision.py holds bf16 to).
Recorded with them: the CPU's model and its bf16 flags, torch's version and threads,
OMP_WAIT_POLICY, and what `auto` resolves to here and why. Compare numbers from one
machine only: how much bf16 pays depends on the CPU (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import ROOT, busy_cpu_seconds, model_for  # noqa: E402
from machine import MATMUL_N, cpu_model, matmul_gflops, speed_flags  # noqa: E402

from oaif.config import TrainConfig  # noqa: E402
from oaif.models import auto_dtype, load_causal_lm  # noqa: E402
from oaif.records import PreferencePair  # noqa: E402
from oaif.train import PreferenceTrainer  # noqa: E402

# size -> (prompt tokens, response tokens): the lengths scripts/bench.py's runs generate.
SIZES = {"0.5M": (32, 64), "2.7M": (32, 256)}
PAIRS = 8


class Neighbours:
    """The share of the machine's CPU time other processes take from now until share(): on a
    shared machine a busy neighbour slows 2-thread torch down many times over, so each
    measurement says how much there was."""

    def __init__(self):
        self.busy, self.ours, self.t0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()

    def share(self) -> float:
        others = (busy_cpu_seconds() - self.busy) - (own_cpu_seconds() - self.ours)
        return max(0.0, others) / ((time.perf_counter() - self.t0) * os.cpu_count())


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def random_pairs(vocab: int, prompt_len: int, response_len: int, seed: int = 0) -> list[PreferencePair]:
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(4, vocab) for _ in range(n)]   # noqa: E731 (ids past the special tokens)
    return [PreferencePair(0, 0, str(i), [], "", "", 1.0, draw(prompt_len), draw(response_len), draw(response_len))
            for i in range(PAIRS)]


def trainer(model: Path, dtype: str, lr: float) -> PreferenceTrainer:
    """As oaif's build_policy makes it for full weights: the policy in fp32 (master weights),
    the frozen reference in `dtype`, the forward passes under autocast to `dtype`."""
    cfg = TrainConfig(learning_rate=lr, batch_size=PAIRS, micro_batch_size=PAIRS)
    policy = load_causal_lm(str(model), "float32", trainable=True)
    reference = load_causal_lm(str(model), dtype, trainable=False)
    return PreferenceTrainer(policy, reference, cfg, pad_id=0, total_steps=1000, compute_dtype=dtype)


def step_seconds(model: Path, pairs: list[PreferencePair], reps: int) -> tuple[dict[str, float], float]:
    """(median seconds of one train_round, one optimizer step, per precision; the median of
    each rep's fp32 / bf16 ratio). The two run back to back in each rep, so a neighbour's load
    that comes and goes slows both sides of a ratio alike."""
    trainers = {d: trainer(model, d, 1e-5) for d in ("float32", "bfloat16")}
    times: dict[str, list[float]] = {d: [] for d in trainers}
    for rep in range(reps + 1):
        for dtype, t in trainers.items():
            t0 = time.perf_counter()
            t.train_round(pairs)
            if rep:   # rep 0 warms up
                times[dtype].append(time.perf_counter() - t0)
    ratio = statistics.median(a / b for a, b in zip(times["float32"], times["bfloat16"]))
    return {d: statistics.median(v) for d, v in times.items()}, ratio


def loss_curves(model: Path, pairs: list[PreferencePair], steps: int, lr: float) -> dict[str, list[float]]:
    curves = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        t = trainer(model, dtype, lr)
        curves[dtype] = [t.train_round(pairs)["train/loss"] for _ in range(steps)]
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (bench.py's runs use 2)")
    parser.add_argument("--loss-steps", type=int, default=10)
    parser.add_argument("--loss-lr", type=float, default=1e-5,
                        help="high enough that the loss moves well away from log 2 in --loss-steps")
    parser.add_argument("--out", default=str(ROOT / "bench/results/dtype"), help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = speed_flags(Path("/proc/cpuinfo").read_text())
    dtype, reason = auto_dtype()
    print(f"{cpu_model()}; flags {flags}; auto -> {dtype} ({reason})")
    watch = Neighbours()
    matmul = {d: [] for d in ("float32", "bfloat16")}
    for _ in range(args.reps):
        for d in matmul:
            matmul[d].append(matmul_gflops(getattr(torch, d), 3))
    matmul_speedup = statistics.median(b / a for a, b in zip(matmul["float32"], matmul["bfloat16"]))
    matmul = {d: statistics.median(v) for d, v in matmul.items()}
    matmul_others = watch.share()
    print(f"matmul {MATMUL_N}²: " + ", ".join(f"{d} {v:.0f} GFLOP/s" for d, v in matmul.items()) +
          f"; others {matmul_others:.0%}")
    sizes = {}
    for size in args.sizes:
        model = model_for(size)
        config = json.loads((model / "config.json").read_text())
        pairs = random_pairs(config["vocab_size"], *SIZES[size])
        watch = Neighbours()
        step, speedup = step_seconds(model, pairs, args.reps)
        others = watch.share()
        curves = loss_curves(model, pairs, args.loss_steps, args.loss_lr)
        diff = max(abs(a - b) for a, b in zip(curves["float32"], curves["bfloat16"]))
        sizes[size] = {"prompt_tokens": SIZES[size][0], "response_tokens": SIZES[size][1], "step_s": step,
                       "bf16_speedup": speedup, "others_cpu_share": others, "loss_curves": curves,
                       "max_loss_diff": diff}
        print(f"{size}: step fp32 {step['float32']:.3f} s, bf16 {step['bfloat16']:.3f} s ({speedup:.2f}x), "
              f"others {others:.0%}; loss {curves['float32'][0]:.4f} -> {curves['float32'][-1]:.4f}, "
              f"max |fp32 - bf16| {diff:.4f}")
    results = {
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "bf16_flags": flags,
                    "torch": torch.__version__, "threads": args.threads,
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
                    "auto": {"dtype": dtype, "reason": reason}},
        "settings": {"reps": args.reps, "pairs": PAIRS, "loss_steps": args.loss_steps, "loss_lr": args.loss_lr,
                     "matmul_n": MATMUL_N},
        "matmul_gflops": matmul, "matmul_bf16_speedup": matmul_speedup, "matmul_others_cpu_share": matmul_others,
        "sizes": sizes,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {out}.json and {out}.md")


def markdown(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    lines = [f"{m['cpu']} ({m['cpus']} CPUs), bf16 flags: {', '.join(m['bf16_flags']) or 'none'}; torch "
             f"{m['torch']}, torch threads: {m['threads']}, OMP_WAIT_POLICY={m['OMP_WAIT_POLICY']}. "
             f"`policy.dtype: auto` here: {m['auto']['dtype']} ({m['auto']['reason']}).", "",
             "| measurement | float32 | bfloat16 | bf16 speed-up | other processes' CPU share |", "|---|---|---|---|---|",
             f"| matmul {s['matmul_n']}² GFLOP/s | {r['matmul_gflops']['float32']:.0f} | "
             f"{r['matmul_gflops']['bfloat16']:.0f} | {r['matmul_bf16_speedup']:.2f}× | {r['matmul_others_cpu_share']:.0%} |"]
    for size, v in r["sizes"].items():
        lines.append(f"| {size} train step s ({s['pairs']} pairs, {v['prompt_tokens']}+{v['response_tokens']} "
                     f"tokens) | {v['step_s']['float32']:.3f} | {v['step_s']['bfloat16']:.3f} | {v['bf16_speedup']:.2f}× | "
                     f"{v['others_cpu_share']:.0%} |")
    lines += ["", f"Medians of {s['reps']} reps, precisions alternating; the speed-up is the median of each rep's "
              f"ratio. Loss curves ({s['loss_steps']} steps on the "
              f"same pairs, lr {s['loss_lr']:g}), largest |fp32 − bf16|: " +
              ", ".join(f"{size} {v['max_loss_diff']:.4f} (loss {v['loss_curves']['float32'][0]:.3f} → "
                        f"{v['loss_curves']['float32'][-1]:.3f})" for size, v in r["sizes"].items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
