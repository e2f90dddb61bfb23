"""The memory a run needs, estimated from the policy's shapes before anything is loaded, and
the check that refuses a run that cannot fit (`check_memory`).

Per policy parameter N, what each part holds (bench/results/memory.md measures the whole
loop's peak against this estimate):
  trainer weights   4 B: float32 master weights (LoRA: the frozen base, in policy.dtype)
  gradients, AdamW  4 + 8 B per trained weight (LoRA: the adapter's only)
  bf16 weight casts 2 B: autocast keeps a bf16 copy of each float32 weight it multiplies
                    during a forward pass (full weights in bfloat16 / float16)
  reference         a frozen copy in policy.dtype (none for a fresh LoRA adapter, whose
                    reference is the base with the adapter off, nor for orpo/simpo/sft)
  engine weights    vLLM's copy in policy.dtype, and its KV cache (generate.kv_cache_gib), in
                    this machine's memory on a CPU (not in server mode: the server holds them)
  judges            a local judge's weights (vllm, transformers: annotate.dtype) and its
                    KV cache (vllm: annotate.kv_cache_gib), for annotate and eval.annotate
  libraries         torch, transformers and vLLM themselves with their buffers (LIBRARIES_GIB)
and, per token of a training micro-batch (2·micro_batch_size sequences of the longest
prompt and response the config allows, the worst case a run can meet), the activations the
backward pass keeps: about 8·hidden + 4·intermediate values per layer (norms, q/k/v,
attention, the MLP's gate, up and product) in the compute dtype, plus the LM head's logits
over the response in float32 (kept three times over: logits, their float copy, the softmax of
the backward). On a GPU the trainer's parts must fit the GPU memory the engines leave it; the
engine's own share is set by generate.gpu_memory_utilization, so it is not counted again.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from oaif.config import ConfigError, RunConfig
from oaif.models import resolve_dtype
from oaif.objectives import LOSSES

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# torch, transformers and vLLM loaded, with what the parts above do not count (the engine's and
# the LM head's buffers, the allocator's slack): the largest shortfall of the other parts
# against the measured peak among scripts/bench_memory.py's runs, SmolLM2 LoRA with gradient
# checkpointing (1.2 GiB over the 1.0 GiB a tiny run's process holds).
LIBRARIES_GIB = 2.2


def safetensors_shapes(model: str) -> dict[str, list[int]] | None:
    """name -> shape of every tensor in the model folder's safetensors files (read from their
    headers: nothing is loaded); None when the model is not a local folder of them."""
    files = sorted(Path(model).expanduser().glob("*.safetensors"))
    if not files:
        return None
    shapes = {}
    for file in files:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        shapes |= {name: t["shape"] for name, t in header.items() if name != "__metadata__"}
    return shapes


def lora_parameters(shapes: dict[str, list[int]], r: int, targets: tuple[str, ...]) -> int:
    """Adapter weights peft adds: r·(in + out) per targeted Linear weight."""
    return sum(r * (shape[0] + shape[1]) for name, shape in shapes.items()
               if len(shape) == 2 and name.endswith(".weight") and name.split(".")[-2] in targets)


def parameters(shapes: dict[str, list[int]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def memory_parts(cfg: RunConfig, shapes: dict[str, list[int]], config: dict
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """(the trainer's parts, the engines', judges' and libraries' parts), in bytes, for this
    config; `config`: the policy's config.json."""
    n = parameters(shapes)
    dtype = resolve_dtype(cfg.policy.dtype)
    lora, size = cfg.train.lora, DTYPE_BYTES[dtype]
    trained = lora_parameters(shapes, lora.r, lora.target_modules) if lora.enabled else n
    needs_reference = LOSSES[cfg.train.loss].needs_reference and not (lora.enabled and not lora.adapter)
    trainer = {
        "trainer weights": n * (size if lora.enabled else 4) + (trained * 4 if lora.enabled else 0),
        "gradients and AdamW": trained * 12,
        "bf16 weight casts": n * 2 if dtype != "float32" and not lora.enabled else 0,
        "reference": n * size if needs_reference else 0,
        "activations": activations(cfg, config, size),
    }
    engine = {} if cfg.generate.servers() else {"engine weights": n * size,
                                                "engine KV cache": cfg.generate.kv_cache_gib * GIB}
    return trainer, engine | judges(cfg) | {"libraries": LIBRARIES_GIB * GIB}


def activations(cfg: RunConfig, config: dict, size: int) -> float:
    """Bytes the backward pass keeps for one micro-batch at the longest sequences the config allows."""
    sequences = 2 * cfg.train.micro_batch_size
    tokens = sequences * (cfg.policy.max_prompt_tokens + cfg.generate.max_new_tokens)
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    per_layer = 8 * hidden + 4 * config.get("intermediate_size", 4 * hidden)
    # Gradient checkpointing keeps each layer's input, and one layer's activations while it is recomputed.
    kept = layers * hidden + per_layer if cfg.train.gradient_checkpointing else layers * per_layer
    body = tokens * kept * size
    return body + sequences * cfg.generate.max_new_tokens * config["vocab_size"] * 4 * 3


def judges(cfg: RunConfig) -> dict[str, float]:
    """The local judges' weights and KV caches, bytes (other backends hold no model here, or a
    small one: a rules judge, an API, your function, a reward model)."""
    out = {}
    for key, a in (("annotate", cfg.annotate), ("eval.annotate", cfg.eval.annotate)):
        if a is None or a.backend not in ("vllm", "transformers"):
            continue
        shapes = safetensors_shapes(a.model or cfg.policy.model)
        dtype = resolve_dtype(cfg.policy.dtype if a.dtype == "auto" else a.dtype)
        weights = 0 if shapes is None else parameters(shapes) * DTYPE_BYTES[dtype]
        out[f"{key} judge"] = weights + (a.kv_cache_gib * GIB if a.backend == "vllm" else 0)
    return out


def available_bytes() -> float | None:
    """MemAvailable of /proc/meminfo: what can be allocated without swapping; None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gib(parts: dict[str, float]) -> str:
    return ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items() if v)


def check_memory(cfg: RunConfig, device: str) -> float | None:
    """The run's estimated need in GiB (None: the policy's shapes are not on disk, e.g. a hub
    id not yet downloaded); refuses, in one line, a run whose estimate exceeds what this
    machine (or the training GPU) has free."""
    shapes, config = safetensors_shapes(cfg.policy.model), Path(cfg.policy.model).expanduser() / "config.json"
    if shapes is None or not config.is_file():
        return None
    trainer, rest = memory_parts(cfg, shapes, json.loads(config.read_text()))
    need = sum(trainer.values()) + sum(rest.values())
    if not cfg.check_memory:
        return need / GIB
    ways = ("train.lora.enabled=true" if not cfg.train.lora.enabled else "",
            "policy.dtype=bfloat16" if resolve_dtype(cfg.policy.dtype) == "float32" else "",
            "a smaller generate.kv_cache_gib" if cfg.generate.kv_cache_gib > 0.5 and not device.startswith("cuda") else "",
            "a smaller train.micro_batch_size" if trainer["activations"] > need / 4 and cfg.train.micro_batch_size > 1 else "")
    advice = "; ".join(w for w in ways if w) or "a smaller policy.model"
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        engines = 0 if cfg.generate.servers() else cfg.generate.gpu_memory_utilization * total
        room, need_here, where = min(free, total - engines), sum(trainer.values()), f"{device} (after the engines' share)"
    else:
        room, need_here, where = available_bytes(), need, "this machine"
        if room is None:
            return need / GIB
        room += _own_rss()   # this process's libraries are loaded already, and counted in the estimate
    if need_here > room:
        raise ConfigError(
            f"policy.model: this run needs about {need_here / GIB:.1f} GiB ({_gib(trainer)}"
            f"{'' if device.startswith('cuda') else ', ' + _gib(rest)} GiB) but {where} has "
            f"{room / GIB:.1f} GiB free; try {advice}, or set check_memory=false to start anyway")
    return need / GIB


def _own_rss() -> float:
    """This process's resident memory, bytes (0 where /proc is not there)."""
    try:
        return int(Path(f"/proc/{os.getpid()}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0.0
