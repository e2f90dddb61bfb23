"""Builds vLLM engines the same way for the policy and a local judge.

The engine runs in this process (no engine subprocess) so that weights can be pushed into
it as tensors (sync.py) without a disk write.
"""

from __future__ import annotations

import os

# Must be set before vLLM builds an engine: keep the engine core in this process.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# vLLM logs every engine step at INFO; the loop prints its own line per round.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

GIB = 1 << 30


def build_llm(model: str, dtype: str, seed: int, kv_cache_gib: float, max_model_len: int,
              tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.4, max_lora_rank: int = 0,
              enforce_eager: bool | None = None):
    """One engine. The KV cache is sized from config because vLLM's CPU default reserves
    most of the machine's memory, which the trainer (and a second engine) also need.
    enforce_eager None: see resolve_eager."""
    from vllm import LLM  # imported here so that config errors surface before vLLM loads

    return LLM(
        model=model, tokenizer=model, dtype=dtype, seed=seed, max_model_len=max_model_len,
        kv_cache_memory_bytes=int(kv_cache_gib * GIB), tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True,
        enforce_eager=resolve_eager(enforce_eager),
        # A prompt prefilled in chunks has its sampled token thrown away, and vLLM then rewinds
        # that request's seeded generator, which a CPU generator cannot do ("CPU Generator does
        # not use offset": every sample here has its own seed). Whole prefills avoid it.
        **({"enable_chunked_prefill": False} if on_cpu() else {}),
        use_tqdm_on_load=False,   # a loading bar on stderr would break up the round table
        # LoRA served by vLLM itself (train.lora.sync: vllm_lora); 0 keeps LoRA support off.
        **({"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": 1} if max_lora_rank else {}),
    )


def resolve_eager(enforce_eager: bool | None) -> bool:
    """The config's enforce_eager; unset: eager on a CPU (there compilation costs more
    start-up than the faster generation saves in a run of tens of rounds), compiled on a GPU."""
    return on_cpu() if enforce_eager is None else enforce_eager


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def shutdown_llm(llm) -> None:
    """End an in-process engine now. vLLM ends one when it is garbage-collected, and ending
    one tears down vLLM's process-wide parallel state: left to the collector, that can happen
    while a later engine in the same process runs (a script's second oaif.run), which then
    fails with "pipeline model parallel group is not initialized"."""
    llm.llm_engine.engine_core.shutdown()
