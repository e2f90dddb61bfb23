"""The memory estimate (oaif/memory.py) and the check that refuses a run that cannot fit."""

import json
import shutil
import struct

import pytest
from conftest import oaif_main

from oaif.config import load_config
from oaif.train import batch_sequences, build_policy, sequence_logps
from oaif.memory import GIB, available_bytes, lora_parameters, memory_parts, parameters, safetensors_shapes


def test_shapes_from_headers_count_the_loaded_models_parameters(tiny_model):
    """Read from the files' headers, without loading: the same count transformers and peft
    give for the loaded model (weights) and the adapter (trained weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shapes = safetensors_shapes(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert parameters(shapes) == model.num_parameters()
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(targets)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_parameters(shapes, 16, targets) == trainable


def test_parts_follow_what_the_run_holds(tiny_model):
    """Full weights: fp32 master weights, gradients and AdamW (16 B), the reference and the
    engine in policy.dtype; a fresh LoRA adapter has no reference copy and trains its adapter
    only; a reference-free loss has none either; server mode holds no engine here."""
    shapes, config = safetensors_shapes(str(tiny_model)), json.loads((tiny_model / "config.json").read_text())
    n = parameters(shapes)
    base = [f"policy.model={tiny_model}", "policy.dtype=float32", "generate.kv_cache_gib=0.25"]
    trainer, rest = memory_parts(load_config(None, base), shapes, config)
    assert trainer["trainer weights"] == 4 * n and trainer["gradients and AdamW"] == 12 * n
    assert trainer["reference"] == 4 * n and trainer["bf16 weight casts"] == 0
    assert rest["engine weights"] == 4 * n and rest["engine KV cache"] == 0.25 * GIB
    activations = trainer["activations"]
    trainer, _ = memory_parts(load_config(None, [*base, "train.micro_batch_size=4"]), shapes, config)
    assert trainer["activations"] == pytest.approx(activations / 2)   # one micro-batch's, at the longest sequences
    trainer, rest = memory_parts(load_config(None, [*base, "policy.dtype=bfloat16"]), shapes, config)
    assert trainer["reference"] == 2 * n and trainer["bf16 weight casts"] == 2 * n and rest["engine weights"] == 2 * n
    lora = lora_parameters(shapes, 16, load_config(None, base).train.lora.target_modules)
    trainer, _ = memory_parts(load_config(None, [*base, "train.lora.enabled=true"]), shapes, config)
    assert trainer["reference"] == 0 and trainer["gradients and AdamW"] == 12 * lora
    trainer, _ = memory_parts(load_config(None, [*base, "train.loss=simpo"]), shapes, config)
    assert trainer["reference"] == 0
    _, rest = memory_parts(load_config(None, [*base, "generate.server_url=http://127.0.0.1:1"]), shapes, config)
    assert "engine weights" not in rest and "engine KV cache" not in rest


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_keeps_less_for_the_backward_and_gives_the_same_gradients(tiny_model, lora):
    """What the backward pass keeps, counted as autograd saves it, shrinks (the estimate's
    activations too), and the gradients are the same, with full weights and with LoRA."""
    import torch

    def run(checkpointing: bool):
        cfg = load_config(None, [f"policy.model={tiny_model}", "policy.dtype=float32", f"train.lora.enabled={lora}",
                                 f"train.gradient_checkpointing={checkpointing}"])
        torch.manual_seed(0)
        policy, _ = build_policy(str(tiny_model), "float32", "cpu", cfg.train)
        batch = batch_sequences([[5] * 20] * 4, [[7] * 30] * 4, 0)
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logps = sequence_logps(policy, *batch)
        logps.sum().backward()
        shapes, config = safetensors_shapes(str(tiny_model)), json.loads((tiny_model / "config.json").read_text())
        estimate = memory_parts(cfg, shapes, config)[0]["activations"]
        return saved[0], estimate, {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}

    (kept, estimate, grads), (kept_gc, estimate_gc, grads_gc) = run(False), run(True)
    assert kept_gc < kept / 3 and estimate_gc < estimate
    assert grads.keys() == grads_gc.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name], rtol=1e-5, atol=1e-6)


def huge_policy(tiny_model, folder, parameters: int):
    """The tiny policy's config and tokenizer with a weights file whose header declares
    `parameters` float32 weights: a sparse file, so the disk holds none of them. Nothing
    reads past the header before the check refuses the run."""
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [parameters // 1000, 1000],
                                                       "data_offsets": [0, parameters // 1000 * 1000 * 4]}}).encode()
    with (folder / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + parameters * 4)
    return folder


@pytest.mark.skipif(available_bytes() is None, reason="needs /proc/meminfo")
def test_a_run_that_cannot_fit_is_refused_before_it_starts(tiny_model, tmp_path):
    """A policy whose full-weight training needs more than the machine has, and a KV cache
    larger than the machine: one line naming the need, what is free and what to change, exit
    2, and no run directory."""
    free = available_bytes() / GIB
    policy = huge_policy(tiny_model, tmp_path / "huge", int(free * GIB / 16))   # 16 B/param > free, 4 B/param fits
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={policy}", f"output_dir={tmp_path}", "name=big",
                  "rounds=1")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("oaif: error: policy.model: this run needs about")
    assert "gradients and AdamW" in line and "train.lora.enabled=true" in line and "check_memory=false" in line
    assert not (tmp_path / "big").exists()

    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=kv",
                  "rounds=1", f"generate.kv_cache_gib={2 * free:.0f}")
    assert r.returncode == 2 and "engine KV cache" in r.stderr and "a smaller generate.kv_cache_gib" in r.stderr
    assert not (tmp_path / "kv").exists()


def test_a_run_that_fits_records_its_estimate(concise_run):
    """The tiny run starts, and its first round records the estimate it was checked against."""
    run_dir, _ = concise_run
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert 1.0 < first["startup/memory_estimate_gib"] < 4.0
