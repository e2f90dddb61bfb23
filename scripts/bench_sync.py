"""Benchmark: what a weight sync costs, seven ways, side by side in one run.

    .venv/bin/python scripts/bench_sync.py            # writes bench/results/sync.json

For each model size it times, on the same running engine:
  inplace   oaif's sync: state-dict tensors into vLLM's reload_weights (no disk write)
  via_disk  save_pretrained to a temp dir in /dev/shm, then reload_weights(weights_path=...)
            (the route a separate vLLM server process needs)
  restart   building a new engine on the saved weights (what tools without an in-place
            update pay per round)
  wire      oaif's server mode: the weights over TCP into a vLLM server process through vLLM's
            weight-transfer API (oaif's gloo engine; pause, transfer, reset prefix cache, resume)
  server    the server mode's fallback, server_weight_sync=path: push_weights_to_server into
            the same server (save to /dev/shm + pause, reload_weights from it, reset, resume)
  process   async_rounds' engine process (oaif/engine/process.py): copy into shared memory, then the
            process reloads; timed until loaded, and until `push` returns (what the trainer
            waits for: the load itself overlaps the next round's sampling)
  copy      the floor: one plain in-memory copy of the same weights
and reports medians and ratios to `inplace`. Models are built like `oaif init-tiny` (no
warm-up: only the shapes matter here), plus SmolLM2-135M-Instruct when its folder exists
(`--smollm2`, made by scripts/demo.sh). The CPU and thread settings are recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"tiny-0.5M": dict(hidden=128, layers=2), "small-25M": dict(hidden=512, layers=8)}


def cpu() -> str:
    """The CPU's name and the flags that decide bf16 speed."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return f"{name} ({', '.join(f for f in ('avx512_bf16', 'amx_bf16') if f in flags) or 'no bf16 instructions'})"


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "bench/results/sync.json"))
    parser.add_argument("--smollm2", default=str(ROOT / "models/smollm2-135m-instruct"),
                        help="SmolLM2's folder (skipped when it does not exist)")
    args = parser.parse_args()

    import torch

    from oaif.engine.vllm import build_llm, shutdown_llm
    from transformers import AutoTokenizer

    from oaif.engine.server import ServerEngine, push_weights_to_server, start_server, stop_server, transfer_args
    from oaif.engine.process import ProcessEngine
    from oaif.engine.weights import hf_named_weights, push_weights
    from oaif.pipeline.tiny import init_tiny
    from oaif.models import load_causal_lm

    results = {"machine": {"cpu": cpu(), "cpus": os.cpu_count(), "platform": platform.platform(),
                           "torch_threads": torch.get_num_threads(),
                           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")},
               "reps": args.reps, "sizes": {}}
    work = Path(tempfile.mkdtemp(prefix="oaif-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        models = {name: init_tiny(work / name, steps=0, log=lambda _: None, **shape) for name, shape in SIZES.items()}
        if Path(args.smollm2, "config.json").exists():
            models["smollm2-135M"] = Path(args.smollm2)
        for name, model_dir in models.items():
            model = load_causal_lm(str(model_dir), "float32", trainable=True)
            n_params = sum(p.numel() for p in model.parameters())
            llm = build_llm(str(model_dir), "float32", seed=0, kv_cache_gib=0.25, max_model_len=256)
            with torch.no_grad():  # new weights, so every sync really changes the engine
                for p in model.parameters():
                    p.add_(0.01)

            inplace = timed(lambda: push_weights(llm, model), args.reps)
            # The floor: one plain in-memory copy of the same weights.
            copy = timed(lambda: [t.clone() for _, t in hf_named_weights(model)], args.reps)

            def via_disk():
                out = work / f"{name}-sync"
                model.save_pretrained(out)
                llm.collective_rpc("reload_weights", kwargs={"weights_path": str(out)})
                llm.reset_prefix_cache()
                shutil.rmtree(out)

            disk = timed(via_disk, args.reps)
            saved = work / f"{name}-saved"   # the trained weights, with the tokenizer an engine needs
            model.save_pretrained(saved)
            AutoTokenizer.from_pretrained(model_dir).save_pretrained(saved)
            restart = timed(lambda: build_llm(str(saved), "float32", seed=1, kv_cache_gib=0.25,
                                              max_model_len=256), 1)
            shutdown_llm(llm)
            proc = start_server(str(model_dir), None, "float32", seed=0, max_model_len=256, kv_cache_gib=0.25,
                                extra_args=transfer_args("wire"))
            url = f"http://127.0.0.1:{proc.port}"
            engine = ServerEngine([url])
            try:
                engine.load_weights(model, 0)   # the first opens the transfer group (and imports vLLM)
                wire = timed(lambda: engine.load_weights(model, 0), args.reps)
                server = timed(lambda: push_weights_to_server(url, model, str(work)), args.reps)
            finally:
                engine.close()
                stop_server(proc)
            actor = ProcessEngine({"model": str(model_dir), "dtype": "float32", "seed": 0, "kv_cache_gib": 0.25,
                                   "max_model_len": 256, "enforce_eager": True})
            try:
                actor.push(hf_named_weights(model))   # the first push allocates the shared buffers
                actor.wait_loaded()
                process_push = timed(lambda: actor.push(hf_named_weights(model)) or actor.wait_loaded(), args.reps)
                returns = []
                for _ in range(args.reps):   # only `push` timed: the load of the last one has finished
                    t0 = time.perf_counter()
                    actor.push(hf_named_weights(model))
                    returns.append(time.perf_counter() - t0)
                    actor.wait_loaded()
                process_return = statistics.median(returns)
            finally:
                actor.close()
            row = {"params": n_params, "copy_s": copy, "inplace_s": inplace, "via_disk_s": disk, "restart_s": restart,
                   "wire_s": wire, "wire_over_copy": wire / copy, "wire_over_inplace": wire / inplace,
                   "server_s": server, "process_s": process_push, "process_critical_s": process_return,
                   "inplace_over_copy": inplace / copy, "process_critical_over_copy": process_return / copy,
                   "via_disk_over_inplace": disk / inplace,
                   "restart_over_inplace": restart / inplace, "server_over_inplace": server / inplace}
            results["sizes"][name] = row
            print(f"{name}: {n_params / 1e6:.1f}M params  copy {copy * 1e3:.1f} ms  inplace {inplace * 1e3:.1f} ms  "
                  f"process {process_push * 1e3:.1f} ms (until pushed {process_return * 1e3:.1f} ms)  "
                  f"via disk {disk * 1e3:.1f} ms ({disk / inplace:.1f}x)  restart {restart:.1f} s "
                  f"({restart / inplace:.0f}x)  wire {wire * 1e3:.1f} ms ({wire / inplace:.1f}x)  "
                  f"server path {server * 1e3:.1f} ms ({server / inplace:.1f}x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
