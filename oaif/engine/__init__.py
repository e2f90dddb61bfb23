"""The policy's engines: where its samples come from and where its new weights go.

    engine = open_policy_engine(cfg)        # in-process, its own process, or a vLLM server
    engine.sample(...); engine.load_weights(policy, version); engine.close()

engine/base.py is the interface; engine/vllm.py (in this process), engine/process.py (a
process of its own, async_rounds) and engine/server.py (a vLLM server) implement it;
engine/weights.py turns a trained policy into the weights an engine loads.
"""

from __future__ import annotations

from pathlib import Path

from oaif.config import RunConfig
from oaif.engine.base import PolicyEngine
from oaif.engine.process import ProcessEngine
from oaif.engine.server import ServerEngine, start_local_server
from oaif.engine.vllm import InProcessEngine, build_llm


def engine_args(cfg: RunConfig, model: str | None = None, max_model_len: int | None = None,
                enforce_eager: bool | None = None) -> dict:
    """build_llm's arguments for the policy's engine (or `model`'s, built the same way: a
    baseline, a revision writer). max_model_len: default, room for a prompt and a round's
    response; enforce_eager: default, the config's."""
    g = cfg.generate
    return dict(model=model or cfg.policy.model, dtype=cfg.policy.dtype, seed=cfg.seed, kv_cache_gib=g.kv_cache_gib,
                max_model_len=max_model_len or cfg.policy.max_prompt_tokens + g.max_new_tokens,
                tensor_parallel_size=g.tensor_parallel_size, gpu_memory_utilization=g.gpu_memory_utilization,
                enforce_eager=g.enforce_eager if enforce_eager is None else enforce_eager)


def local_engine(cfg: RunConfig, model: str | None = None, max_model_len: int | None = None,
                 enforce_eager: bool | None = None) -> InProcessEngine:
    """An engine in this process for a command that only samples (eval, best-of-n, critique)."""
    return InProcessEngine(build_llm(**engine_args(cfg, model, max_model_len, enforce_eager)))


def on_server(cfg: RunConfig, launched: bool) -> bool:
    """Whether open_policy_engine gives the loop vLLM servers (generate.server_url(s), or the one
    rank 0 starts under a launcher): they load the full weights (gathered from sharded ranks
    first), and may hold anything at first. Every rank can tell, with or without the engine."""
    return bool(cfg.generate.servers()) or launched


def open_policy_engine(cfg: RunConfig, max_model_len: int, adapters: Path, launched: bool,
                       wait: bool = True) -> PolicyEngine:
    """The loop's engine, as the config asks: the servers at generate.server_url(s); under a
    launcher, a server of its own (rank 0 samples for every rank); async_rounds, a process of
    its own (wait=False: built while the caller goes on); else in this process, LoRA merged
    in or (train.lora.sync vllm_lora) served as an adapter saved under `adapters`."""
    g, lora = cfg.generate, cfg.train.lora
    if g.servers():   # the two cases of on_server
        return ServerEngine(g.servers(), key_env=g.server_api_key_env, sync=g.server_weight_sync,
                            weights_dir=g.server_weights_dir, drop_dead=g.server_drop_dead)
    if launched:
        return start_local_server(cfg)
    args = engine_args(cfg, max_model_len=max_model_len)
    if cfg.async_rounds:
        return ProcessEngine(args, threads=cfg.async_threads, cpu_bind=cfg.async_cpus or None, wait=wait)
    if lora.enabled and lora.sync == "vllm_lora":
        return InProcessEngine(build_llm(**args, max_lora_rank=lora.r), adapters)
    return InProcessEngine(build_llm(**args))
