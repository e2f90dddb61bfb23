"""generate.tensor_parallel_size 2 on a CPU: vLLM's two worker processes get this process's
cores split between them (engine/vllm.py build_llm), generate what one engine generates, and
take every weight sync."""

import os

import pytest
import torch
from transformers import AutoTokenizer

from oaif.config import ConfigError, GenerateConfig
from oaif.datasets_io import load_prompts
from oaif.engine.process import ProcessEngine
from oaif.engine.vllm import THREADS_BIND, InProcessEngine, build_llm, shutdown_llm, split_cores
from oaif.generate import Generator
from oaif.models import load_causal_lm
from oaif.records import read_jsonl

from conftest import ROOT, hf_greedy, run_oaif, versions_follow_training

ENGINE = dict(dtype="float32", seed=0, kv_cache_gib=0.25, max_model_len=256, enforce_eager=True)
two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two workers need a core each")


@pytest.fixture(scope="module")
def engines(tiny_model):
    """(one engine, a tensor-parallel one) on the tiny model. The second is built while the
    first lives, as a policy engine may be beside a judge's: vLLM has then cached its
    environment, which build_llm must read again for the binding to reach the workers."""
    single = build_llm(str(tiny_model), **ENGINE)
    try:
        parallel = build_llm(str(tiny_model), **ENGINE, tensor_parallel_size=2)
    except BaseException:
        shutdown_llm(single)
        raise
    yield single, parallel
    shutdown_llm(parallel)
    shutdown_llm(single)


def test_the_cores_are_split_between_the_workers():
    assert split_cores({0, 1}, 2) == "0|1"
    assert split_cores(set(range(8)), 2) == "0,1,2,3|4,5,6,7"
    assert split_cores({1, 3, 5, 7, 9}, 2) == "1,3|5,7"   # the odd one left to this process
    with pytest.raises(ConfigError, match="generate.tensor_parallel_size: 4 .* may use 2"):
        split_cores({0, 1}, 4)


def test_the_binding_is_set_only_while_the_engine_starts_and_a_users_own_is_kept(monkeypatch):
    seen = []
    monkeypatch.setattr("vllm.LLM", lambda **kwargs: seen.append(os.environ.get(THREADS_BIND)))
    monkeypatch.delenv(THREADS_BIND, raising=False)
    build_llm("m", **ENGINE, tensor_parallel_size=2)
    build_llm("m", **ENGINE)
    assert seen == [split_cores(os.sched_getaffinity(0), 2), None] and THREADS_BIND not in os.environ
    monkeypatch.setenv(THREADS_BIND, "1|0")
    build_llm("m", **ENGINE, tensor_parallel_size=2)
    assert seen[-1] == "1|0" and os.environ[THREADS_BIND] == "1|0"


@two_cores
def test_two_shards_generate_what_one_engine_generates(tiny_model, engines):
    single, parallel = engines
    gen = Generator(InProcessEngine(single), AutoTokenizer.from_pretrained(tiny_model), GenerateConfig(),
                    max_prompt_tokens=128)
    prompt_ids = [gen.encode(p) for p in load_prompts(ROOT / "prompts/tiny_prompts.jsonl")[:6]]
    one = InProcessEngine(single).greedy(prompt_ids, 48)
    # The sync tests load noise into the shared tensor-parallel engine (the order is random): start weights first.
    InProcessEngine(parallel).load_weights(load_causal_lm(str(tiny_model), "float32", trainable=False), 0)
    assert InProcessEngine(parallel).greedy(prompt_ids, 48) == one
    assert len({tuple(ids) for ids in one}) > 1 and min(map(len, one)) > 4   # not one degenerate answer


@two_cores
def test_a_sync_reaches_both_shards(tiny_model, engines):
    check_sync_reaches_both_shards(tiny_model, InProcessEngine(engines[1]))


@two_cores
def test_a_sync_reaches_both_shards_in_an_engine_process(tiny_model):
    """async_rounds' engine: the weights go through shared memory to its process, then to the workers."""
    engine = ProcessEngine(dict(model=str(tiny_model), **ENGINE, tensor_parallel_size=2))
    try:
        check_sync_reaches_both_shards(tiny_model, engine)
    finally:
        engine.close()


def check_sync_reaches_both_shards(tiny_model, engine) -> None:
    """Every weight moved (seeded noise, as training would), pushed through the engine's
    load_weights; then its greedy output is transformers' for the moved weights, and not the
    old one. A shard that kept its old half (each holds half of every layer and of the
    vocabulary) fails it. (A few DPO steps at a high learning rate are too weak a check here:
    they collapse the tiny policy to repeating one token, which half the new weights still pick.)"""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    gen = Generator(engine, tokenizer, GenerateConfig(), max_prompt_tokens=128)
    prompt_ids = [gen.encode(p) for p in load_prompts(ROOT / "prompts/tiny_prompts.jsonl")[:6]]
    policy = load_causal_lm(str(tiny_model), "float32", trainable=False)
    engine.load_weights(policy, 0)   # the module's engine may hold another test's weights
    before = engine.greedy(prompt_ids, 48)
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in policy.parameters():
            weight.add_(0.05 * torch.randn(weight.shape, generator=noise))
    engine.load_weights(policy, 1)
    after = engine.greedy(prompt_ids, 48)
    assert after == [hf_greedy(policy, ids, 48, tokenizer.eos_token_id) for ids in prompt_ids]
    assert sum(a != b for a, b in zip(after, before)) >= 3 and len({tuple(ids) for ids in after}) > 1


def test_too_few_cores_for_the_workers_is_one_config_error(tiny_model):
    """The engine process pinned to one core cannot give two workers one each: its build fails
    with the ConfigError itself, not a traceback, so the CLI prints one line."""
    with pytest.raises(ConfigError, match="tensor_parallel_size: 2 .* may use 1; lower it"):
        ProcessEngine(dict(model=str(tiny_model), **ENGINE, tensor_parallel_size=2), cpu_bind="0")


@two_cores
@pytest.mark.parametrize("async_rounds", [0, 1])
def test_a_run_with_two_shards(tiny_model, tmp_path, async_rounds):
    """Through the CLI, the engine in this process or (async_rounds) in its own."""
    r = run_oaif("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=tp",
                 "generate.tensor_parallel_size=2", "rounds=2", "prompts_per_round=8", f"async_rounds={async_rounds}")
    assert r.returncode == 0, r.stderr[-3000:]
    versions_follow_training(read_jsonl(tmp_path / "tp/metrics.jsonl"), trained_at_least=1)
