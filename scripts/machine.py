"""The machine a benchmark ran on, as its results record it: the CPU's model and flags, the
thread settings, and a measured matmul peak. scripts/bench.py and scripts/bench_dtype.py
import it; bench.py also runs it as a script, with the environment its tools run in:

    .venv/bin/python scripts/machine.py DTYPE THREADS OUT.json

Numbers from different machines are never compared in one table: how fast a CPU runs each
precision differs many times over (docs/benchmarks.md, "float32 or bfloat16"), so every result
says which machine it comes from and how fast that machine multiplies matrices.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from oaif.models import cpu_flags

MATMUL_N = 2048
# What decides a precision's speed on a CPU: AMX and AVX512-BF16 compute bf16 natively, AVX-512
# and AVX2 set the fp32 width (oaif.models.choose_dtype reads amx_bf16 and avx512_bf16).
FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in (cpuinfo.read_text() if cpuinfo.is_file() else "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def speed_flags(cpuinfo: str) -> list[str]:
    """The FLAGS this CPU has, from the text of /proc/cpuinfo."""
    flags = cpu_flags(cpuinfo)
    return [f for f in FLAGS if f in flags]


def matmul_gflops(dtype: torch.dtype, reps: int) -> float:
    """A MATMUL_N² matmul's GFLOP/s in dtype (2·n³ FLOPs each), the median of reps after a
    warm-up, on torch's current threads: the peak a training step's matmuls can reach."""
    a, b = torch.randn(MATMUL_N, MATMUL_N).to(dtype), torch.randn(MATMUL_N, MATMUL_N).to(dtype)
    a @ b   # warm-up: the first call picks and loads the kernel
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * MATMUL_N ** 3 / statistics.median(times) / 1e9


def record(dtype: str, threads: int, reps: int = 5) -> dict:
    """This machine as a result records it, with its matmul peak in dtype on `threads` torch
    threads (set here: the probe runs on the threads the benchmarked tools run on)."""
    torch.set_num_threads(threads)
    cpuinfo = Path("/proc/cpuinfo")
    return {
        "cpu": cpu_model(), "cpus": os.cpu_count(),
        "flags": speed_flags(cpuinfo.read_text() if cpuinfo.is_file() else ""),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "dtype": dtype, "matmul_n": MATMUL_N, "peak_gflops": matmul_gflops(getattr(torch, dtype), reps),
    }


if __name__ == "__main__":
    dtype, threads, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    out.write_text(json.dumps(record(dtype, threads), indent=1))
