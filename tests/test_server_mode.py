"""Tier 2, server mode: a real vLLM server process, real DPO steps, weights pushed through
the server's endpoints (pause -> reload_weights -> reset_prefix_cache -> resume)."""

import socket

import pytest
import torch
from transformers import AutoTokenizer

from oaif.annotate.judge import judge_pairs
from oaif.annotate.rules import RulesAnnotator
from oaif.config import TrainConfig
from oaif.constitution import load_constitution
from oaif.records import Sample, load_prompts
from oaif.server import ServerEngine, push_weights_to_server, start_server, stop_server
from oaif.train import DPOTrainer, load_causal_lm

from conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encode(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def server(tiny_model):
    port = free_port()
    # Generous deadline: another vLLM test may be sharing the 2 cores.
    proc = start_server(str(tiny_model), port, "float32", seed=0, max_model_len=512, kv_cache_gib=0.25,
                        timeout_s=400)
    engine = ServerEngine(f"http://127.0.0.1:{port}")
    yield f"http://127.0.0.1:{port}", engine
    engine.close()
    stop_server(proc)


def test_server_samples_carry_exact_tokens_and_eos(tiny_model, server):
    # Runs before the training test below, which changes the shared server's weights.
    _, engine = server
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = load_prompts(ROOT / "prompts/tiny_prompts.jsonl")[:6]
    groups = engine.sample([encode(tokenizer, p.messages) for p in prompts], n=2, temperature=0.9, top_p=1.0,
                           max_tokens=64)
    assert len(groups) == 6 and all(len(g) == 2 for g in groups)
    for token_ids, text, finish_reason in (s for g in groups for s in g):
        assert tokenizer.decode(token_ids, skip_special_tokens=True) == text
        assert finish_reason in ("stop", "length")
        if finish_reason == "stop":
            assert token_ids[-1] == tokenizer.eos_token_id
    assert any(fr == "stop" for g in groups for _, _, fr in g), "the tiny policy should end some answers"
    # The server is seeded once, not per request: the samples of one prompt differ.
    assert sum(g[0][1] != g[1][1] for g in groups) >= 4


def test_after_dpo_steps_and_push_server_greedy_equals_transformers(tiny_model, server):
    base_url, engine = server
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    policy = load_causal_lm(str(tiny_model), "float32", trainable=True)
    reference = load_causal_lm(str(tiny_model), "float32", trainable=False)
    # A large learning rate so that a few steps visibly change greedy outputs.
    trainer = DPOTrainer(policy, reference, TrainConfig(learning_rate=3e-3, batch_size=8, micro_batch_size=4),
                         tokenizer.pad_token_id)
    judge = RulesAnnotator(load_constitution(ROOT / "constitutions/concise.yaml"))
    prompts = load_prompts(ROOT / "prompts/tiny_prompts.jsonl")
    check_ids = [encode(tokenizer, p.messages) for p in prompts[:6]]
    before = engine.greedy(check_ids, 48)

    for version in range(3):
        batch = prompts[8 + 16 * version: 24 + 16 * version]
        ids = [encode(tokenizer, p.messages) for p in batch]
        groups = engine.sample(ids, n=2, temperature=0.9, top_p=1.0, max_tokens=64)
        samples = [[Sample(round=version, policy_version=version, prompt_id=p.id, messages=p.messages, index=k,
                           text=text, prompt_token_ids=pids, token_ids=token_ids, finish_reason=finish_reason)
                    for k, (token_ids, text, finish_reason) in enumerate(group)]
                   for p, pids, group in zip(batch, ids, groups)]
        pairs = judge_pairs(judge, [(g[0], g[1]) for g in samples], version, version).pairs
        # The untrained policy gives pairs of different lengths; the large learning rate can
        # collapse later rounds to equal lengths (no pairs), which is fine for this check.
        assert pairs or version > 0, "the tiny policy should give pairs of different lengths"
        if pairs:
            trainer.train_round(pairs)
        seconds = push_weights_to_server(base_url, policy)
        print(f"\npush_weights_to_server: {seconds * 1000:.0f} ms")
        assert seconds >= 0
    assert trainer.steps >= 2

    policy.eval()
    hf = [hf_greedy(policy, ids, 48, tokenizer.eos_token_id) for ids in check_ids]
    after = engine.greedy(check_ids, 48)
    assert after == hf, "the server must generate exactly what the trained transformers policy generates"
    assert after != before, "training should have changed at least one greedy output (else the check is vacuous)"


def test_loop_in_server_mode_through_the_cli(tiny_model, server, tmp_path):
    """`oaif run` with generate.server_url: samples come from the server process and each
    round's weights reach it through its reload endpoints."""
    from oaif.records import read_jsonl

    from conftest import run_oaif

    url, _ = server
    r = run_oaif("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 "name=server", "rounds=3", "prompts_per_round=8", f"generate.server_url={url}")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_jsonl(tmp_path / "server/metrics.jsonl")
    assert [m["policy_version"] for m in metrics] == [1, 2, 3]
    assert all(m["sync/seconds"] > 0 for m in metrics)
    samples = read_jsonl(tmp_path / "server/rounds/000002/samples.jsonl")
    assert len(samples) == 16 and all(s["policy_version"] == 2 and s["token_ids"] for s in samples)
