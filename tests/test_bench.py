"""scripts/bench.py's accounting: the training FLOP estimate it divides by the measured peak,
checked against torch's own FLOP counter on a tiny model, and the machine every result names.
The benchmark itself takes minutes and is run by hand (docs/benchmarks.md)."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from oaif.records import PreferencePair, write_jsonl
from oaif.train import batch_sequences, lora_model, sequence_logps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench  # noqa: E402
import machine  # noqa: E402

LAYERS, WIDTH, PROMPT, RESPONSE = 4, 64, 3, 5
BODY = LAYERS * 10 * WIDTH ** 2   # per layer: q, k, v, o (W x W each), gate, up, down (W x 2W each)
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "down_proj"]}


def counted_flops(config: LlamaConfig, lora: dict | None) -> int:
    """What torch counts for oaif's DPO passes on one sequence: the policy's forward and
    backward, then the reference's forward (a frozen copy; with LoRA, the adapter disabled)."""
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    if lora:
        policy = lora_model(policy, lora["r"], lora["alpha"], 0.0, lora["target_modules"], "CAUSAL_LM")
    else:
        reference = LlamaForCausalLM(config).requires_grad_(False)
    batch = batch_sequences([[5] * PROMPT], [[7] * RESPONSE], pad_id=0)
    with FlopCounterMode(display=False) as counter:
        sequence_logps(policy, *batch).sum().backward()
        with torch.no_grad():
            if lora:
                with policy.disable_adapter():
                    sequence_logps(policy, *batch)
            else:
                sequence_logps(reference, *batch)
    return counter.get_total_flops()


@pytest.fixture
def config(tmp_path):
    # Eager attention: its products are plain matmuls, which the counter counts in full.
    config = LlamaConfig(vocab_size=100, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=WIDTH // 2,
                         tie_word_embeddings=False, attn_implementation="eager")
    config.save_pretrained(tmp_path)
    return config


def test_the_training_flop_estimate_matches_torchs_count_for_full_weights(config, tmp_path):
    shape = bench.model_shape(tmp_path, None)
    counts = bench.token_counts([(PROMPT, RESPONSE)])
    # What torch counts that the estimate leaves out as not useful: eager attention also
    # multiplies the masked (future) half of QKᵀ and AV.
    s = PROMPT + RESPONSE
    masked_half = 8 * LAYERS * WIDTH * s ** 2
    assert shape["body"] == {"policy": BODY, "reference": BODY, "trained": BODY}
    assert bench.train_flops(shape, counts) + masked_half == counted_flops(config, None)


def test_the_training_flop_estimate_bounds_torchs_count_under_lora(config, tmp_path):
    """With LoRA, autograd skips the gradients below the first adapter (part of the first layer's
    backward), which the estimate counts: it may exceed torch's count by at most a layer's
    share, never fall short of it."""
    shape = bench.model_shape(tmp_path, LORA)
    adapters = LAYERS * LORA["r"] * ((WIDTH + WIDTH) + (2 * WIDTH + WIDTH))   # q_proj, down_proj
    assert shape["body"] == {"policy": BODY + adapters, "reference": BODY, "trained": adapters}
    assert shape["head"]["trained"] == 0
    s = PROMPT + RESPONSE
    estimate = bench.train_flops(shape, bench.token_counts([(PROMPT, RESPONSE)])) \
        + 8 * LAYERS * WIDTH * s ** 2   # as in the full-weights test
    counted = counted_flops(config, LORA)
    assert counted <= estimate <= counted * (1 + 1 / LAYERS)


def test_the_tokens_trained_on_are_read_from_the_runs_pair_records(tmp_path):
    def pair(prompt: int, chosen: int, rejected: int) -> PreferencePair:
        return PreferencePair(0, 0, "p", [], "", "", 1.0, [1] * prompt, [2] * chosen, [3] * rejected)

    write_jsonl(tmp_path / "rounds/000000/pairs.jsonl", [pair(3, 5, 7)])
    write_jsonl(tmp_path / "rounds/000001/pairs.jsonl", [pair(2, 4, 6), pair(1, 1, 1)])
    assert bench.trained_sequences(tmp_path) == [(3, 5), (3, 7), (2, 4), (2, 6), (1, 1), (1, 1)]


def test_the_table_names_the_machine_and_the_share_of_its_peak():
    shape = {"body": {"policy": 10 ** 6, "reference": 10 ** 6, "trained": 10 ** 6},
             "head": {"policy": 0, "reference": 0, "trained": 0}, "layers": 1, "attention_width": 0}
    rep = {"loop_s": 10.0, "whole_s": 20.0, "peak_gib": 1.0, "tokens_per_s": 100.0, "pairs": 8, "ties": 0,
           "sync_s_per_sync": None, "trained": bench.token_counts([(400, 600)]),
           "stages_s": {"generate": 5.0, "judge": 0.0, "train": 2.0, "sync": None, "other": None}}
    summary = bench.summarize([rep], 1.0, shape, peak_gflops=40.0)
    # 8 FLOPs per weight and token, 10⁶ weights, 1000 tokens: 8 GFLOP in 2 s, a tenth of 40.
    assert summary["train_gflops"] == pytest.approx(4.0) and summary["train_peak_share"] == pytest.approx(0.1)
    cpuinfo = "processor\t: 0\nmodel name\t: Some EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16 sse4_2\n"
    results = {
        "machine": {"cpu": "Some EPYC", "cpus": 2, "flags": machine.speed_flags(cpuinfo), "torch": "2.x",
                    "torch_threads": 2, "OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "unset",
                    "dtype": "bfloat16", "dtype_reason": "policy.dtype auto: the CPU has AVX512-BF16 (avx512_bf16)",
                    "matmul_n": 2048, "peak_gflops": 40.0, "peak_others_cpu_share": 0.0,
                    "others_cpu_share_max": 0.0},
        "settings": {"reps": 1, "sizes": {"0.5M": {"steps": 3}}, "prompts_per_step": 8, "async_overrides": [],
                     "trl_dtype": "bfloat16"},
        "sizes": {"0.5M": {"weights_mb": 1.0, "summary": {"oaif": summary, "trl": summary}}},
    }
    header, *_ = bench.markdown(results).splitlines()
    assert header.startswith("Machine: Some EPYC (2 CPUs), flags: avx512_bf16, avx512f, avx2;")
    for fact in ("2 torch threads", "OMP_WAIT_POLICY=ACTIVE", "Both tools in bfloat16 (policy.dtype auto",
                 "2048² matmul in bfloat16 at 40 GFLOP/s"):
        assert fact in header
    assert "| 4.0 (10%) |" in bench.markdown(results)
