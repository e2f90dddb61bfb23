"""vLLM engines in this process, built the same way for the policy and a local judge.

The engine core runs in this process (no engine subprocess) so that weights can be pushed
into it as tensors (engine/weights.py) without a disk write.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from oaif.config import ConfigError
from oaif.engine.base import Completion, Submitted
from oaif.engine.weights import push_lora_adapter, push_weights
from oaif.models import resolve_dtype

# Must be set before vLLM builds an engine: keep the engine core in this process.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# vLLM logs every engine step at INFO; the loop prints its own line per round.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

GIB = 1 << 30
THREADS_BIND = "VLLM_CPU_OMP_THREADS_BIND"


def build_llm(model: str, dtype: str, seed: int, kv_cache_gib: float, max_model_len: int,
              tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.4, max_lora_rank: int = 0,
              enforce_eager: bool | None = None):
    """One engine. The KV cache is sized from config because vLLM's CPU default reserves
    most of the machine's memory, which the trainer (and a second engine) also need.
    enforce_eager None: see resolve_eager."""
    from vllm import LLM  # imported here so that config errors surface before vLLM loads
    import vllm.envs

    release_import_tracebacks()

    # Set only while the workers start, so that a later engine still sees what the user set.
    bind = cpu_threads_bind(tensor_parallel_size)
    if bind:
        os.environ.update(bind)
        # vLLM caches its environment once an engine is built: an engine already in this
        # process (a judge) would leave it reading the unbound default.
        vllm.envs.disable_envs_cache()
    try:
        return LLM(
            model=model, tokenizer=model, dtype=resolve_dtype(dtype), seed=seed, max_model_len=max_model_len,
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
    finally:
        for key in bind:
            del os.environ[key]


def release_import_tracebacks() -> None:
    """vLLM keeps, in module globals, errors it caught while importing (an optional audio
    decoder that is not installed: vllm/multimodal/media/audio.py), and with each its
    traceback, which holds every frame that was on the stack at that first import. Imported
    inside a run, that pinned the run's Loop, its policy and trainer, for the life of the process."""
    for name, module in list(sys.modules.items()):
        if name.startswith("vllm") and module is not None:
            for value in list(vars(module).values()):
                if isinstance(value, BaseException):
                    value.__traceback__ = None


def cpu_threads_bind(tensor_parallel_size: int) -> dict[str, str]:
    """The environment tensor-parallel CPU workers need, for an engine in this process or a
    server it starts: vLLM starts one worker process per shard (even with the engine core in
    this process) and by default binds each to a NUMA node of its own, refusing to start with
    fewer nodes than workers (a small machine has one). Unless the user bound them
    (VLLM_CPU_OMP_THREADS_BIND), they get this process's cores split between them. Empty on
    GPUs and without tensor parallelism."""
    if tensor_parallel_size <= 1 or not on_cpu() or THREADS_BIND in os.environ:
        return {}
    return {THREADS_BIND: split_cores(os.sched_getaffinity(0), tensor_parallel_size)}


def split_cores(cores: set[int], workers: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `workers` tensor-parallel CPU workers: `cores` in that many
    equal groups, in order ({0..7}, 2 -> '0,1,2,3|4,5,6,7'). A remainder binds no worker: this
    process (the engine's scheduler, the trainer) runs there too. Fewer cores than workers is
    refused: workers sharing a core would take turns at every step's all-reduce."""
    if len(cores) < workers:
        raise ConfigError(f"generate.tensor_parallel_size: {workers} tensor-parallel CPU workers need a core each, "
                          f"and this process may use {len(cores)}; lower it, or bind them with {THREADS_BIND}")
    ids, size = sorted(cores), len(cores) // workers
    return "|".join(",".join(map(str, ids[i * size:(i + 1) * size])) for i in range(workers))


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
    try:
        llm.collective_rpc(forget_reload_records)
    finally:   # an engine whose workers failed is still ended
        llm.llm_engine.engine_core.shutdown()


def forget_reload_records(worker) -> None:
    """On each worker of an engine that is ending: drop its layers from vLLM's process-wide
    record of how to reload them. The record is a weak dictionary, but once weights were
    reloaded its entries refer back to their layer (through the wrapped weight loaders), so
    without this the model outlives its engine: a script's repeated oaif.run grew by about
    1.2 GB a run at 135M parameters (vLLM 0.32 on CPU; tests/test_api.py checks it)."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    for layer in worker.model_runner.get_model().modules():
        LAYERWISE_INFO.pop(layer, None)


class InProcessEngine(Submitted):
    """A vllm.LLM in this process (engine/base.py's PolicyEngine). adapters: the folder for
    train.lora.sync vllm_lora, where each version's LoRA adapter is saved and handed to vLLM
    (the engine must be built with max_lora_rank); None: weights are pushed in place (a LoRA
    adapter merged in)."""

    def __init__(self, llm, adapters: Path | None = None):
        self.llm, self.adapters, self.lora_request = llm, adapters, None

    def _generate(self, prompt_token_ids: list[list[int]], params):   # one SamplingParams, or one per prompt
        from vllm import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids], params,
                                 use_tqdm=False, lora_request=self.lora_request)

    def sample(self, prompt_token_ids, seeds, temperature, top_p, max_tokens) -> list[list[Completion]]:
        from vllm import SamplingParams

        flat = [(ids, s) for ids, row in zip(prompt_token_ids, seeds) for s in row]
        outs = self._generate([ids for ids, _ in flat], [
            SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=s) for _, s in flat])
        done = iter([(list(o.outputs[0].token_ids), o.outputs[0].text, o.outputs[0].finish_reason) for o in outs])
        return [[next(done) for _ in row] for row in seeds]

    def greedy(self, prompt_token_ids, max_tokens) -> list[list[int]]:
        from vllm import SamplingParams

        outs = self._generate(prompt_token_ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        return [list(o.outputs[0].token_ids) for o in outs]

    def load_weights(self, policy: torch.nn.Module, version: int, state_dict: dict | None = None) -> None:
        if self.adapters is not None:
            self.lora_request = push_lora_adapter(policy, self.adapters, version)
        else:
            push_weights(self.llm, policy)

    def close(self) -> None:
        if self.llm is not None:
            shutdown_llm(self.llm)
            self.llm = None
