"""Training depth through the CLI: every loss, LoRA, starting from a trained adapter, export."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from oaif.records import read_jsonl

from conftest import run_oaif

FAST = ["rounds=2", "prompts_per_round=8", "generate.enforce_eager=true"]  # FAST[2:]: eager only


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "soft", "ipo", "slic", "kto"])
def test_each_loss_runs_through_the_cli(tiny_model, tmp_path, loss):
    extra = ["train.margin_scale=0.5"] if loss == "soft" else ["train.length_normalize=true"] if loss == "ipo" else []
    r = run_oaif("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 f"name={loss}", f"train.loss={loss}", "train.warmup_steps=2", "train.lr_schedule=cosine", *FAST,
                 *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_jsonl(tmp_path / loss / "metrics.jsonl")
    assert len(metrics) == 2 and all(m["train/steps"] > 0 for m in metrics)
    losses = [m["train/loss"] for m in metrics]
    assert all(isinstance(v, float) and v == v for v in losses)  # finite, not NaN
    assert (tmp_path / loss / "checkpoints/round_000001/trainer.pt").is_file()


def test_lora_learns_shorter_then_resumes_from_its_adapter_and_exports(tiny_model, tmp_path):
    # 1. A LoRA run learns the "prefer shorter" preference, like the full-weights run.
    r = run_oaif("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 "name=lora", "rounds=6", "train.lora.enabled=true", "train.learning_rate=2e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_jsonl(tmp_path / "lora/metrics.jsonl")
    first, last = metrics[0]["generate/mean_length"], metrics[-1]["generate/mean_length"]
    assert last < 0.75 * first, f"LoRA run: mean length {first:.1f} -> {last:.1f}"
    assert metrics[-1]["train/kl_to_ref"] > 0.05  # the policy moved far from the base model
    checkpoint = tmp_path / "lora/checkpoints/round_000005"
    adapter = checkpoint / "policy"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()

    # 2. Starting from that adapter, the reference is a frozen copy of base+adapter, not the base:
    #    before the first step the policy equals its reference, so the KL estimate is ~0.
    r = run_oaif("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 "name=from-adapter", "rounds=1", "train.lora.enabled=true", f"train.lora.adapter={adapter}",
                 "train.epochs_per_round=1", "train.batch_size=64", *FAST[2:])
    assert r.returncode == 0, r.stderr[-3000:]
    [m] = read_jsonl(tmp_path / "from-adapter/metrics.jsonl")
    assert abs(m["train/kl_to_ref"]) < 1e-3 and abs(m["train/reward_margin"]) < 1e-3
    # ... and round 0 sampled from base+adapter (short answers), not from the base model.
    assert m["generate/mean_length"] < 0.75 * first

    # 3. Export: the adapter merged into the base, a plain model with the policy's outputs.
    out = tmp_path / "merged"
    r = run_oaif("export", str(checkpoint), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    from peft import PeftModel

    merged = AutoModelForCausalLM.from_pretrained(out)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
    ids = torch.tensor([[3, 10, 20, 30, 40]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_model(ids).logits, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-2)
