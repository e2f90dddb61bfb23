"""Training depth through the CLI: every loss, LoRA, starting from a trained adapter, export."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from oaif.records import PreferencePair, read_jsonl

from conftest import ROOT, oaif_main, versions_follow_training

FAST = ["rounds=2", "prompts_per_round=8", "generate.enforce_eager=true"]  # FAST[2:]: eager only


def test_the_configured_loss_and_beta_are_what_a_cli_run_computes(tiny_model, tmp_path):
    """Which formula and β each train.loss name selects is checked for every loss on fixed
    log-probs in test_trainer_wiring.py. This run proves that the name and β of a config reach
    that computation: a round of one step starts from policy == reference, where every pair's
    margin is 0, so IPO's loss is (0 - 1/(2β))² = 4 at β = 0.25 (DPO's would be log 2 = 0.69,
    SLiC's 1, and IPO's at its default β of 1, 0.25)."""
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=ipo",
                 "train.loss=ipo", "train.beta=0.25", "rounds=1", "train.epochs_per_round=1", "train.warmup_steps=2",
                 "train.lr_schedule=cosine", *FAST[1:])
    assert r.returncode == 0, r.stderr[-3000:]
    [m] = read_jsonl(tmp_path / "ipo/metrics.jsonl")
    assert m["pairs_kept"] > 0 and m["train/steps"] == 1, m
    assert m["train/loss"] == pytest.approx(4.0, abs=1e-4), m["train/loss"]
    assert (tmp_path / "ipo/checkpoints/round_000000/trainer.pt").is_file()


@pytest.mark.parametrize("loss, extra", [("orpo", []), ("simpo", []),
                                         # rejection-sampling fine-tuning: SFT on the best of 4
                                         ("sft", ["generate.samples_per_prompt=4", "annotate.ranking=knockout"])])
def test_reference_free_losses_learn_shorter_through_the_cli(tiny_model, tmp_path, loss, extra):
    """ORPO and SimPO at their paper defaults (and the DPO run's learning rate), and SFT on the
    annotator's best response, learn the "prefer shorter" preference like DPO
    (tests/test_loop.py), with no reference model: no KL to a reference in training or in the
    evaluation after the last round."""
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 f"name={loss}", f"train.loss={loss}", "rounds=8", "eval.every=8", "eval.max_prompts=20", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_jsonl(tmp_path / loss / "metrics.jsonl")
    versions_follow_training(metrics, trained_at_least=6)
    first, last = metrics[0]["generate/mean_length"], metrics[-1]["generate/mean_length"]
    assert last < 0.75 * first, f"{loss}: mean length {first:.1f} -> {last:.1f}: the policy did not learn 'shorter'"
    trained = [m for m in metrics if "train/loss" in m]
    assert all(math.isfinite(m["train/loss"]) and math.isfinite(m["train/reward_margin"]) for m in trained)
    assert not any("train/kl_to_ref" in m for m in metrics)
    final = metrics[-1]
    assert final["eval/kl_to_ref"] is None and final["eval/mean_length"] < final["eval/baseline_mean_length"]


def test_lora_learns_shorter_then_resumes_from_its_adapter_and_exports(tiny_model, tmp_path):
    # 1. A LoRA run learns the "prefer shorter" preference, like the full-weights run, with
    #    train.lora.sync=vllm_lora: the engine keeps the base weights and samples each round
    #    through the round's adapter. Its samples getting shorter is the proof that they came
    #    from the adapter (an engine still serving the base would sample base lengths).
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 "name=lora", "rounds=6", "train.lora.enabled=true", "train.learning_rate=2e-3",
                 "train.lora.sync=vllm_lora")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_jsonl(tmp_path / "lora/metrics.jsonl")
    versions = versions_follow_training(metrics, trained_at_least=3)
    first, last = metrics[0]["generate/mean_length"], metrics[-1]["generate/mean_length"]
    assert last < 0.75 * first, f"LoRA run: mean length {first:.1f} -> {last:.1f}"
    assert metrics[-1]["train/kl_to_ref"] > 0.05  # the policy moved far from the base model
    # One adapter folder per synced version; once a checkpoint holds the weights (here the
    # last round's), the older ones go.
    assert sorted(p.name for p in (tmp_path / "lora/adapters").iterdir()) == [f"v{versions[-1]:06d}"]
    checkpoint = tmp_path / "lora/checkpoints/round_000005"
    adapter = checkpoint / "policy"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()

    # 2. Starting from that adapter, the reference is a frozen copy of base+adapter, not the base:
    #    before the first step the policy equals its reference, so the KL estimate is ~0.
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 "name=from-adapter", "rounds=1", "train.lora.enabled=true", f"train.lora.adapter={adapter}",
                 "train.epochs_per_round=1", "train.batch_size=64", *FAST[2:])
    assert r.returncode == 0, r.stderr[-3000:]
    [m] = read_jsonl(tmp_path / "from-adapter/metrics.jsonl")
    assert abs(m["train/kl_to_ref"]) < 1e-3 and abs(m["train/reward_margin"]) < 1e-3
    # ... and round 0 sampled from base+adapter (short answers), not from the base model.
    assert m["generate/mean_length"] < 0.75 * first

    # 3. Export: the adapter merged into the base, a plain model with the policy's outputs.
    out = tmp_path / "merged"
    r = oaif_main("export", str(checkpoint), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    from peft import PeftModel

    merged = AutoModelForCausalLM.from_pretrained(out)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
    ids = torch.tensor([[3, 10, 20, 30, 40]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_model(ids).logits, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-2)


def test_bfloat16_run_keeps_float32_master_weights(tiny_model, tmp_path):
    """policy.dtype=bfloat16: engine, reference and forward passes in bf16 (checked in the next
    test), trained weights in fp32, so updates far below bf16's resolution (lr 1e-6 on weights
    of ~0.05) still land."""
    from safetensors.torch import load_file

    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 "name=bf16", "policy.dtype=bfloat16", "train.learning_rate=1e-6", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_jsonl(tmp_path / "bf16/metrics.jsonl")
    assert all(math.isfinite(m["train/loss"]) for m in metrics)
    trained = load_file(tmp_path / "bf16/checkpoints/round_000001/policy/model.safetensors")
    base = load_file(tiny_model / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in trained.values())
    changed = sum((trained[k] != base[k]).sum().item() for k in base) / sum(v.numel() for v in base.values())
    # bf16 keeps 8 bits of mantissa: adding ~1e-6 to a weight of ~0.05 would change ~none of them.
    bf16_changed = sum((trained[k].bfloat16() != base[k].bfloat16()).sum().item() for k in base) / \
        sum(v.numel() for v in base.values())
    # (Embedding rows of tokens that never occur get no gradient, hence not ~100%.)
    assert changed > 0.6 and bf16_changed < 0.2, (changed, bf16_changed)


def test_bfloat16_policy_dtype_reaches_the_engine_the_reference_and_the_forward_passes(tiny_model, tmp_path,
                                                                                       monkeypatch):
    """What `oaif run` builds from policy.dtype=bfloat16: the vLLM engine gets bfloat16, the frozen
    reference's weights are bfloat16, the trained weights float32, and the training forward
    passes of both models compute in bfloat16 (autocast), seen at their output layers."""
    from oaif.config import PolicyConfig, RunConfig, TrainConfig
    from oaif.checkpoint import build_trainer
    from oaif.loop import Loop

    cfg = RunConfig(policy=PolicyConfig(model=str(tiny_model), dtype="bfloat16"), output_dir=str(tmp_path),
                    train=TrainConfig(learning_rate=1e-3, batch_size=2, micro_batch_size=2))
    trainer = build_trainer(cfg, pad_id=0, total_steps=1)
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.bfloat16}
    seen = {"policy": set(), "reference": set()}
    for name, model in (("policy", trainer.policy), ("reference", trainer.reference)):
        model.lm_head.register_forward_hook(lambda module, args, out, name=name: seen[name].add(out.dtype))
    pairs = [PreferencePair(0, 0, str(i), [], "a", "b", 0.9, [3, 4 + i], [5, 6 + i, 1], [7 + i, 8, 9, 1])
             for i in range(2)]
    assert trainer.train_round(pairs)["train/steps"] == 1
    assert seen == {"policy": {torch.bfloat16}, "reference": {torch.bfloat16}}

    class EngineBuilt(Exception):
        pass

    def build_llm(model, dtype, *args, **kwargs):   # stands in for vLLM: record the dtype, stop setup
        raise EngineBuilt(dtype)

    monkeypatch.setattr("oaif.engine.build_llm", build_llm)   # where the factory finds it
    monkeypatch.chdir(ROOT)   # the default prompt set and constitution are relative paths
    with pytest.raises(EngineBuilt) as built:
        with Loop(cfg):
            pass
    assert built.value.args == ("bfloat16",)


def test_a_step_with_non_finite_gradients_is_skipped_and_repeated_ones_stop_the_run(tiny_model):
    """Fault injection: a gradient hook turns one step's gradients into NaN (a real run gets
    there from an overflow or a bad batch). The step changes no weight and is counted; three
    in a row stop training with a clear error and the weights from before them."""
    import copy

    from oaif.config import RunStopped, TrainConfig
    from oaif.train import PreferenceTrainer
    from oaif.models import load_causal_lm

    policy = load_causal_lm(str(tiny_model), "float32", trainable=True)
    reference = load_causal_lm(str(tiny_model), "float32", trainable=False)
    trainer = PreferenceTrainer(policy, reference, TrainConfig(learning_rate=1e-3, batch_size=2, micro_batch_size=2), 0)
    pairs = [PreferencePair(0, 0, str(i), [], "a", "b", 0.9, [1, 2, 3], [4 + i, 5], [6, 7 + i, 8]) for i in range(4)]
    poison = {"left": 1}
    weight = policy.get_input_embeddings().weight

    def nan_once(grad):
        if poison["left"]:
            poison["left"] -= 1
            return grad * float("nan")
        return grad

    weight.register_hook(nan_once)
    before = copy.deepcopy(policy.state_dict())
    m = trainer.train_round(pairs[:2])   # one step, poisoned
    assert m["train/skipped_steps"] == 1 and trainer.steps == 0 and m["train/grad_norm"] is None
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    m = trainer.train_round(pairs)       # two clean steps
    assert m["train/skipped_steps"] == 0 and trainer.steps == 2 and m["train/grad_norm"] > 0
    poison["left"] = 3
    kept = copy.deepcopy(policy.state_dict())
    with pytest.raises(RunStopped, match="3 optimizer steps in a row had non-finite gradients"):
        trainer.train_round(pairs + pairs[:2])
    assert all(torch.equal(kept[k], v) for k, v in policy.state_dict().items())


def test_kto_reference_point_does_not_depend_on_the_micro_batch_size(tiny_model):
    """KTO's z0 is the whole step's mean log-ratio, not each micro-batch's: gradient
    accumulation in passes of 1 pair gives the weights of one pass of 4."""
    from oaif.config import TrainConfig
    from oaif.train import PreferenceTrainer
    from oaif.models import load_causal_lm

    pairs = [PreferencePair(0, 0, str(i), [], "a", "b", 0.9, [1, 2, 3], [4 + i, 5, 2], [6, 7 + 3 * i, 8, 9, 2])
             for i in range(4)]
    weights = []
    for micro in (4, 1):
        policy = load_causal_lm(str(tiny_model), "float32", trainable=True)
        reference = load_causal_lm(str(tiny_model), "float32", trainable=False)
        cfg = TrainConfig(loss="kto", learning_rate=1e-2, batch_size=4, micro_batch_size=micro)
        trainer = PreferenceTrainer(policy, reference, cfg, 0)
        for _ in range(3):   # after the first step the policy differs from the reference: z0 > 0
            trainer.train_round(pairs)
        weights.append({k: v.clone() for k, v in policy.state_dict().items()})
    differ = max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0])
    # Passes of other shapes round differently (up to ~2e-4 after Adam at lr 1e-2: the LM head
    # multiplies the whole micro-batch at once); a z0 taken per micro-batch moves the weights
    # ~8e-3 apart.
    assert differ < 1e-3, differ


def test_policy_gradient_learns_shorter_with_its_kl_leash(tiny_model, tmp_path):
    """rloo: the annotator's preference as the reward, the other sample as the baseline, PPO's
    clipped ratio (2 epochs per round, so the second pass is off the sampling policy) and the
    KL penalty. Mean length falls under the concise constitution, and the KL to the
    reference is measured."""
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 "name=rloo", "train.loss=rloo", "rounds=8", "train.epochs_per_round=2")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_jsonl(tmp_path / "rloo" / "metrics.jsonl")
    versions_follow_training(metrics, trained_at_least=6)
    first, last = metrics[0]["generate/mean_length"], metrics[-1]["generate/mean_length"]
    assert last < 0.75 * first, f"rloo: mean length {first:.1f} -> {last:.1f}: the policy did not learn 'shorter'"
    assert all(math.isfinite(m["train/kl_to_ref"]) for m in metrics if "train/loss" in m)
