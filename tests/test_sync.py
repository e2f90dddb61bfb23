"""Tier 2: the real vLLM engine, real DPO steps, the real in-place weight sync."""

import pytest
from transformers import AutoTokenizer

from oaif.annotate.judge import judge_pairs
from oaif.annotate.rules import RulesAnnotator
from oaif.config import GenerateConfig, LoraConfig, TrainConfig
from oaif.constitution import load_constitution
from oaif.engine.vllm import InProcessEngine, build_llm, shutdown_llm
from oaif.generate import Generator
from oaif.datasets_io import load_prompts
from oaif.engine.weights import push_weights
from oaif.train import PreferenceTrainer

from conftest import ROOT, hf_greedy, train_push_and_compare_greedy


@pytest.fixture(scope="module")
def engine(tiny_model):
    llm = build_llm(str(tiny_model), "float32", seed=0, kv_cache_gib=0.25, max_model_len=256)
    yield llm
    shutdown_llm(llm)


@pytest.fixture(scope="module")
def lora_engine(tiny_model):
    """A LoRA-enabled engine, kept for the module: an engine that is freed while another
    lives tears down vLLM's process-wide parallel state under the living one (seen when the
    suite ran shuffled: the shared engine then failed with "pipeline model parallel group is
    not initialized")."""
    llm = build_llm(str(tiny_model), "float32", seed=0, kv_cache_gib=0.25, max_model_len=256, max_lora_rank=8,
                    enforce_eager=True)
    yield llm
    shutdown_llm(llm)


def test_samples_carry_exact_tokens_and_eos(tiny_model, engine):
    from oaif.models import load_causal_lm

    push_weights(engine, load_causal_lm(str(tiny_model), "float32", trainable=False))   # whatever ran before
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    gen = Generator(InProcessEngine(engine), tokenizer, GenerateConfig(max_new_tokens=64), max_prompt_tokens=128)
    prompts = load_prompts(ROOT / "prompts/tiny_prompts.jsonl")[:6]
    groups, metrics = gen.sample(prompts, 0, 0)
    assert all(len(g) == 2 for g in groups)
    for s in (s for g in groups for s in g):
        assert tokenizer.decode(s.token_ids, skip_special_tokens=True) == s.text
        if s.finish_reason == "stop":
            assert s.token_ids[-1] == tokenizer.eos_token_id
    # Each sample has its own seed: the samples of one prompt differ; a round repeats exactly
    # whatever the engine sampled in between (resume relies on it), another round differs.
    assert sum(g[0].text != g[1].text for g in groups) >= 4
    gen.sample(prompts[3:], 7, 0)
    assert gen.sample(prompts, 0, 0)[0] == groups
    assert [s.text for g in gen.sample(prompts, 1, 0)[0] for s in g] != [s.text for g in groups for s in g]
    assert metrics["generate/mean_length"] > 0


def test_after_dpo_steps_and_sync_vllm_greedy_equals_transformers(tiny_model, engine):
    train_push_and_compare_greedy(tiny_model, InProcessEngine(engine), lambda policy: push_weights(engine, policy))


def test_the_sync_loads_in_place_with_no_restart_and_no_disk_write(tiny_model, engine, monkeypatch):
    """The README: the in-process sync loads the weights into the running engine (no new
    engine, no process started) and writes nothing (no save of any kind, no new file in the
    temp folder or /dev/shm); the engine then serves the new weights."""
    import tempfile
    from pathlib import Path

    import safetensors.torch
    import torch
    import transformers

    from oaif.models import load_causal_lm

    policy = load_causal_lm(str(tiny_model), "float32", trainable=False)
    push_weights(engine, policy)   # whatever ran before
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    def wrote(*args, **kwargs):
        raise AssertionError("the sync wrote the weights out")

    for owner, name in ((torch, "save"), (safetensors.torch, "save_file"), (safetensors.torch, "save_model"),
                        (transformers.PreTrainedModel, "save_pretrained")):
        monkeypatch.setattr(owner, name, wrote)
    listed = lambda: {p for d in (Path(tempfile.gettempdir()), Path("/dev/shm")) for p in d.iterdir()}  # noqa: E731
    files, core = listed(), engine.llm_engine.engine_core
    push_weights(engine, policy)
    assert engine.llm_engine.engine_core is core and listed() - files == set()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    gen = Generator(InProcessEngine(engine), tokenizer, GenerateConfig(max_new_tokens=32), max_prompt_tokens=128)
    ids = [gen.encode(p) for p in load_prompts(ROOT / "prompts/tiny_prompts.jsonl")[:4]]
    assert gen.greedy(ids, 32) == [hf_greedy(policy.eval(), i, 32, tokenizer.eos_token_id) for i in ids]


@pytest.mark.parametrize("sync", ["merge", "vllm_lora"])
def test_lora_sync_matches_the_peft_policy(tiny_model, engine, lora_engine, tmp_path, sync):
    """Both LoRA syncs: W + BA pushed into the shared engine, or vLLM's own LoRA loading (a
    new adapter id per version) in a LoRA-enabled engine. Either way vLLM then generates what
    the peft model generates (and something else than before training), and the adapter
    stays unmerged for training."""
    from oaif.engine.weights import push_lora_adapter
    from oaif.train import build_policy

    llm = engine if sync == "merge" else lora_engine
    served = InProcessEngine(llm)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    gen = Generator(served, tokenizer, GenerateConfig(max_new_tokens=48), max_prompt_tokens=128)
    cfg = TrainConfig(learning_rate=1e-2, batch_size=8, micro_batch_size=8,
                      lora=LoraConfig(enabled=True, r=8, alpha=16))
    policy, reference = build_policy(str(tiny_model), "float32", "cpu", cfg)
    assert reference is None  # fresh adapter: the reference is the base with the adapter disabled
    trainer = PreferenceTrainer(policy, reference, cfg, tokenizer.pad_token_id)
    judge = RulesAnnotator(load_constitution(ROOT / "constitutions/concise.yaml"))
    prompts = load_prompts(ROOT / "prompts/tiny_prompts.jsonl")

    def push(version: int) -> None:
        if sync == "merge":
            push_weights(llm, policy)
        else:
            served.lora_request = push_lora_adapter(policy, tmp_path / "adapters", version)

    push(0)  # the shared engine may hold another test's weights
    check_ids = [gen.encode(p) for p in prompts[40:46]]
    before = gen.greedy(check_ids, 48)
    for version in range(2):
        groups, _ = gen.sample(prompts[16 * version: 16 * version + 16], version, version)
        trainer.train_round(judge_pairs(judge, [(g[0], g[1]) for g in groups], version, version).pairs)
        push(version + 1)
    assert not any(getattr(m, "merged", False) for m in policy.modules())
    policy.eval()
    after = gen.greedy(check_ids, 48)
    assert after == [hf_greedy(policy, ids, 48, tokenizer.eos_token_id) for ids in check_ids]
    assert after != before, "training should change some greedy output (else an engine ignoring the adapter passes)"
    if sync == "vllm_lora":
        assert served.lora_request.lora_int_id == 3   # versions 0, 1, 2: a new id each


def test_lora_merge_leaves_a_bf16_base_untouched_and_rounds_once(tiny_model):
    """The merge sync pushes W + BA computed out of place: after many syncs the bf16 base is
    bit-for-bit what it was (merging and unmerging in place would round it every round), and
    each pushed weight is the float32 sum rounded once."""
    import torch

    from oaif.engine.weights import hf_named_weights
    from oaif.train import build_policy

    policy, _ = build_policy(str(tiny_model), "bfloat16", "cpu", TrainConfig(lora=LoraConfig(enabled=True, r=4)))
    torch.manual_seed(0)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)   # a trained adapter (B starts at 0)
    base = {n: t.clone() for n, t in policy.get_base_model().state_dict().items() if "lora_" not in n}
    for _ in range(20):
        pushed = dict(hf_named_weights(policy))
    assert all(torch.equal(t, base[n]) for n, t in policy.get_base_model().state_dict().items() if n in base)
    layer = policy.get_base_model().model.layers[0].self_attn.q_proj
    want = (layer.base_layer.weight.float() + layer.get_delta_weight("default").float()).to(torch.bfloat16)
    got = pushed["model.layers.0.self_attn.q_proj.weight"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, want) and not torch.equal(got, layer.base_layer.weight)
