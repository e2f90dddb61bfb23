"""What PreferenceTrainer does with its config: which loss and β it uses, how margin, label
smoothing, soft labels and KTO's reference point reach the loss, gradient accumulation,
gradient clipping and dropout. The loss formulas themselves are checked in test_losses.py;
these tests check that the trainer calls them with the right arguments."""

import json
import math
import shutil
import typing

import pytest
import torch

from oaif.config import TrainConfig
from oaif.losses import dpo_loss, ipo_loss, kto_loss, orpo_loss, simpo_loss, slic_loss
from oaif.objectives import LOSSES
from oaif.records import PreferencePair
from oaif.train import PreferenceTrainer, batch_sequences, build_policy, sequence_logps
from oaif.models import load_causal_lm

# Three pairs of fixed log-probs: policy chosen/rejected (PC, PR), reference (RC, RR).
# Log-ratios: chosen [1, −0.5, 0.5], rejected [−1, 1, −0.8]; h = [2, −1.5, 1.3].
PC, PR = torch.tensor([-10.0, -12.0, -7.5]), torch.tensor([-12.0, -11.0, -9.0])
RC, RR = torch.tensor([-11.0, -11.5, -8.0]), torch.tensor([-11.0, -12.0, -8.2])
P_CHOSEN = torch.tensor([0.9, 0.6, 0.75])
# The paper's β per loss (OAIF §4; cDPO, soft and KTO keep DPO's; ORPO's λ, Hong et al. 2024;
# SimPO, Meng et al. 2024), written out rather than read from oaif.config so that a wrong
# default fails here.
PAPER_BETA = {"dpo": 0.1, "cdpo": 0.1, "soft": 0.1, "ipo": 1.0, "slic": 0.002, "kto": 0.1, "orpo": 0.1, "simpo": 2.0}


def trainer_for(**cfg) -> PreferenceTrainer:
    """A trainer whose loss() can be called on fixed tensors (the policy is a stand-in)."""
    return PreferenceTrainer(torch.nn.Linear(1, 1), None, TrainConfig(**cfg), pad_id=0)


def expected_loss(loss: str, beta: float, margin_scale: float, smoothing: float, wd: float, wu: float, z0,
                  gamma: float = 0.7):
    """The pure function from oaif.losses that `loss` names, with the arguments the docs give it."""
    margin = margin_scale * (2 * P_CHOSEN - 1)
    if loss == "dpo":
        return dpo_loss(PC, PR, RC, RR, beta, margin=margin)
    if loss == "cdpo":
        return dpo_loss(PC, PR, RC, RR, beta, smoothing=smoothing, margin=margin)
    if loss == "soft":   # ε = 1 − p: the annotator's probability is the target
        return dpo_loss(PC, PR, RC, RR, beta, smoothing=1 - P_CHOSEN, margin=margin)
    if loss == "ipo":    # no margin, no smoothing
        return ipo_loss(PC, PR, RC, RR, beta)
    if loss == "slic":
        return slic_loss(PC, PR, RC, RR, beta)
    if loss == "orpo":   # reference-free: RC, RR unused; β is λ
        return orpo_loss(PC, PR, beta)
    if loss == "simpo":
        return simpo_loss(PC, PR, beta, gamma)
    desirable = torch.tensor([True] * 3 + [False] * 3)   # chosen desirable, rejected undesirable
    per = kto_loss(torch.cat([PC, PR]), torch.cat([RC, RR]), desirable, beta, torch.tensor(z0), wd, wu)
    return (per[:3] + per[3:]) / 2


@pytest.mark.parametrize("loss", list(PAPER_BETA))
def test_trainer_uses_the_configured_loss_with_its_paper_beta_and_settings(loss):
    """Each train.loss name reaches its own formula with its own default β, and margin_scale,
    label_smoothing, the soft label, the KTO weights and SimPO's γ are passed through
    (non-default values, so that ignoring one changes the number)."""
    settings = dict(margin_scale=0.5, label_smoothing=0.2, kto_desirable_weight=1.5, kto_undesirable_weight=0.5,
                    simpo_gamma=0.7)
    trainer = trainer_for(loss=loss, **settings)
    assert trainer.beta == PAPER_BETA[loss]
    got = trainer.loss(PC, PR, RC, RR, P_CHOSEN, z0=torch.tensor(0.3))
    want = expected_loss(loss, PAPER_BETA[loss], 0.5, 0.2, 1.5, 0.5, 0.3)
    assert torch.allclose(got, want, rtol=1e-6, atol=0), (got, want)
    # An explicit train.beta overrides the default.
    trainer = trainer_for(loss=loss, beta=0.37, **settings)
    assert trainer.beta == 0.37
    got = trainer.loss(PC, PR, RC, RR, P_CHOSEN, z0=torch.tensor(0.3))
    assert torch.allclose(got, expected_loss(loss, 0.37, 0.5, 0.2, 1.5, 0.5, 0.3), rtol=1e-6, atol=0)


def test_every_train_loss_choice_is_registered():
    """train.loss's choices and oaif.objectives.LOSSES name the same losses, in the same order
    (the order of the config's errors)."""
    assert list(LOSSES) == list(typing.get_args(typing.get_type_hints(TrainConfig)["loss"]))


def test_the_losses_differ_on_the_fixed_tensors():
    """Guard for the test above: on these tensors no two losses (nor margin on/off) give the same
    numbers, so a name that fell through to another loss, or a setting ignored, would show."""
    values = [expected_loss(name, beta, 0.5, 0.2, 1.5, 0.5, 0.3) for name, beta in PAPER_BETA.items()]
    values.append(expected_loss("dpo", 0.1, 0.0, 0.2, 1.5, 0.5, 0.3))   # dpo without margin
    values.append(expected_loss("kto", 0.1, 0.5, 0.2, 1.0, 1.0, 0.3))   # kto with default weights
    values.append(expected_loss("simpo", 2.0, 0.5, 0.2, 1.5, 0.5, 0.3, gamma=1.0))   # simpo with default γ
    for i, a in enumerate(values):
        for b in values[i + 1:]:
            assert (a - b).abs().max() > 1e-3


def test_kto_loss_without_a_reference_point_uses_the_pairs_weighted_mean_log_ratio():
    """z0=None: the reference point is these pairs' own mean log-ratio, weight-0 (padding)
    pairs left out: (1 − 0.5 − 1 + 1) / 4 = 0.125 over the first two pairs."""
    trainer = trainer_for(loss="kto")
    got = trainer.loss(PC, PR, RC, RR, P_CHOSEN, weights=torch.tensor([1.0, 1.0, 0.0]))
    assert torch.allclose(got, expected_loss("kto", 0.1, 0.0, 0.0, 1.0, 1.0, 0.125), rtol=1e-6, atol=0)


def pairs_of(n: int) -> list[PreferencePair]:
    """n pairs with different prompts, lengths and tokens (pad 0, EOS 1)."""
    return [PreferencePair(0, 0, str(i), [], "a", "b", 0.6 + 0.1 * (i % 4), [3 + i, 10, 20 + 2 * i][:2 + i % 2],
                           [4 + i, 5 + 3 * i, 1][: 2 + (i + 1) % 2], [6 + 2 * i, 7 + i, 8, 9 + i, 1]) for i in range(n)]


def test_kto_reference_point_is_the_steps_weighted_mean_log_ratio(tiny_model):
    """reference_point (KTO's z0): the mean of log πθ(y|x) − log π0(y|x) over every chosen and
    rejected response of the step, padding pairs (weight 0) left out, across micro-batches;
    computed here one sequence at a time."""
    policy = load_causal_lm(str(tiny_model), "float32", trainable=True)
    reference = load_causal_lm(str(tiny_model), "float32", trainable=False)
    torch.manual_seed(0)
    with torch.no_grad():   # move the policy away from the reference: log-ratios of order 1
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer = PreferenceTrainer(policy, reference, TrainConfig(loss="kto", micro_batch_size=2), pad_id=0)
    pairs, weights = pairs_of(3), [1.0, 1.0, 0.0]

    def log_ratio(prompt, response):
        batch = batch_sequences([prompt], [response], 0)
        with torch.no_grad():
            return (sequence_logps(policy, *batch) - sequence_logps(reference, *batch)).item()

    ratios = [[log_ratio(p.prompt_token_ids, r) for r in (p.chosen_token_ids, p.rejected_token_ids)] for p in pairs]
    want = sum(w * (c + r) for w, (c, r) in zip(weights, ratios)) / (2 * sum(weights))
    unweighted = sum(c + r for c, r in ratios) / 6
    assert abs(want - unweighted) > 0.05   # the padding pair would show
    trainer.score_round(pairs)   # the reference's log-probs, as train_round scores them before its steps
    assert math.isclose(trainer.reference_point(pairs, weights).item(), want, abs_tol=1e-4)


def trained(tiny_model, pairs, **cfg) -> tuple[dict, dict, list[dict]]:
    """(metrics, weights after) of one train_round from the tiny model, and the gradients each
    optimizer step was taken with (after any clipping)."""
    policy = load_causal_lm(str(tiny_model), "float32", trainable=True)
    reference = load_causal_lm(str(tiny_model), "float32", trainable=False)
    trainer = PreferenceTrainer(policy, reference, TrainConfig(**cfg), pad_id=0)
    stepped = []
    trainer.optimizer.register_step_pre_hook(lambda *_: stepped.append(
        {k: p.grad.clone() for k, p in policy.named_parameters() if p.grad is not None}))
    metrics = trainer.train_round(pairs)
    return metrics, {k: v.clone() for k, v in policy.state_dict().items()}, stepped


def norm(grads: dict) -> float:
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()


def test_gradient_accumulation_gives_the_step_of_one_pass(tiny_model):
    """batch_size 4 in passes of 1, 2, 3 (uneven: 3 + 1) or 4 pairs: one optimizer step with the
    same gradient (the mean over the 4 pairs), hence the same weights and grad_norm. The
    gradient is compared as well as the weights because AdamW's first step is about
    lr·sign(g): blind to a wrong scale, and noisy (~1e-5 here) where g is near its eps."""
    pairs = pairs_of(4)
    runs = {m: trained(tiny_model, pairs, learning_rate=1e-3, batch_size=4, micro_batch_size=m, max_grad_norm=0)
            for m in (4, 1, 2, 3)}   # no clipping: the raw accumulated gradient reaches the step
    (metrics4, weights4, [grads4]) = runs[4]
    assert metrics4["train/steps"] == 1 and norm(grads4) > 1e-3
    for micro, (metrics, weights, [grads]) in runs.items():
        assert grads.keys() == grads4.keys()
        grad_differ = max((grads[k] - grads4[k]).abs().max().item() for k in grads4)
        assert grad_differ < 1e-6 * norm(grads4), (micro, grad_differ)
        differ = max((weights[k] - weights4[k]).abs().max().item() for k in weights4)
        assert differ < 1e-4, (micro, differ)   # a micro-batch lost or misweighted: ~1e-3 (lr)
        assert math.isclose(metrics["train/grad_norm"], metrics4["train/grad_norm"], rel_tol=1e-5), micro


def test_max_grad_norm_clips_the_step_and_reports_the_norm_before_clipping(tiny_model):
    """max_grad_norm 0: no clipping, the step uses the gradient whose norm is reported. A tiny
    max_grad_norm: the step uses a gradient of that norm, train/grad_norm still reports the norm
    before clipping, and the weights move less (AdamW normalises the gradient's scale, so the
    update only shrinks once the clipped gradient is below its eps, 1e-8: hence 1e-10)."""
    pairs = pairs_of(4)
    free, clipped = (trained(tiny_model, pairs, learning_rate=1e-3, batch_size=4, micro_batch_size=4,
                             max_grad_norm=max_norm) for max_norm in (0.0, 1e-10))
    start = load_causal_lm(str(tiny_model), "float32", trainable=False).state_dict()
    moved = [max((w[k] - start[k]).abs().max().item() for k in start) for _, w, _ in (free, clipped)]
    (free_metrics, _, [free_grads]), (clipped_metrics, _, [clipped_grads]) = free, clipped
    free_norm, clipped_norm = norm(free_grads), norm(clipped_grads)
    assert free_metrics["train/grad_norm"] > 1e-3
    assert math.isclose(free_norm, free_metrics["train/grad_norm"], rel_tol=1e-4)
    assert math.isclose(clipped_metrics["train/grad_norm"], free_metrics["train/grad_norm"], rel_tol=1e-4)
    assert clipped_norm <= 1.001e-10
    assert moved[1] < 0.1 * moved[0], moved


def model_with_dropout(arch: str, tiny_model, tmp_path):
    """A model whose config turns dropout on: the tiny Llama with attention_dropout (a config
    float that the attention layers read; no nn.Dropout module), or a small GPT-2 (nn.Dropout
    modules for embeddings, attention and residuals)."""
    out = tmp_path / arch
    if arch == "llama":
        shutil.copytree(tiny_model, out)
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.3}))
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.3,
                                   embd_pdrop=0.3, attn_pdrop=0.3)).save_pretrained(out)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])   # llama: a float copied from the config, not a module
def test_disable_dropout_makes_the_training_policy_deterministic(arch, tiny_model, tmp_path):
    """train.disable_dropout: the policy in training mode is the function that sampled: two
    forward passes agree and every nn.Dropout has p 0. Without it, dropout stays as configured
    (which shows that the model really has dropout to turn off)."""
    path = model_with_dropout(arch, tiny_model, tmp_path)
    ids = torch.tensor([[3, 10, 20, 30, 40, 50, 60]])
    for disable in (False, True):
        policy, _ = build_policy(str(path), "float32", "cpu", TrainConfig(disable_dropout=disable))
        assert policy.training
        torch.manual_seed(0)
        same = torch.equal(policy(ids).logits, policy(ids).logits)
        dropout_p = {m.p for m in policy.modules() if isinstance(m, torch.nn.Dropout)}
        if disable:
            assert same and dropout_p <= {0.0}, (same, dropout_p)
        else:
            assert not same and dropout_p == ({0.3} if arch == "gpt2" else set()), (same, dropout_p)


@pytest.mark.parametrize("loss", ["orpo", "simpo"])
@pytest.mark.parametrize("start", ["full", "lora", "from_adapter"])
def test_reference_free_losses_build_and_run_no_reference(loss, start, tiny_model, tmp_path, monkeypatch):
    """orpo, simpo: build_policy builds no reference (full weights: the model is loaded once,
    for the policy; from a trained adapter: no frozen copy of base+adapter), no reference pass
    runs (not even LoRA's adapter-disabled one), and the loss gets per-token mean log-probs
    with length_normalize off: the step's logged log-probs are the starting policy's means,
    its rewards β times them, and there is no train/kl_to_ref."""
    import dataclasses

    import oaif.train
    from oaif.config import LoraConfig

    lora = LoraConfig(enabled=start != "full", r=4)
    if start == "from_adapter":
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        adapter = get_peft_model(load_causal_lm(str(tiny_model), "float32", trainable=True),
                                 PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        adapter.save_pretrained(tmp_path / "adapter")
        lora = dataclasses.replace(lora, adapter=str(tmp_path / "adapter"))
    cfg = TrainConfig(loss=loss, learning_rate=1e-3, batch_size=4, micro_batch_size=2, lora=lora)
    loads, load = [], oaif.train.load_causal_lm
    monkeypatch.setattr(oaif.train, "load_causal_lm", lambda *a, **k: loads.append(a) or load(*a, **k))
    policy, reference = build_policy(str(tiny_model), "float32", "cpu", cfg)
    assert reference is None and len(loads) == 1

    pairs = pairs_of(4)   # chosen responses of 2 and 3 tokens: a sum is not a mean
    with torch.no_grad():
        means = [sequence_logps(policy, *batch_sequences([p.prompt_token_ids], [p.chosen_token_ids], 0),
                                length_normalize=True).item() for p in pairs]

    def no_reference(*_):
        raise AssertionError("a reference-free loss ran a reference pass")

    monkeypatch.setattr(oaif.train, "reference_model", no_reference)
    monkeypatch.setattr(PreferenceTrainer, "_score_fixed", no_reference)   # the reference (and rloo's start) pass
    trainer = PreferenceTrainer(policy, reference, cfg, pad_id=0)
    metrics = trainer.train_round(pairs)
    assert metrics["train/steps"] == 1 and "train/kl_to_ref" not in metrics
    assert math.isclose(metrics["train/logps_chosen"], sum(means) / 4, rel_tol=1e-5)
    assert math.isclose(metrics["train/rewards_chosen"], PAPER_BETA[loss] * sum(means) / 4, rel_tol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_reference_free_losses_load_no_reference_and_run_no_reference_pass(tiny_model, monkeypatch, lora):
    """orpo, simpo and sft: no reference model is loaded (full weights) and no reference pass
    runs (with LoRA, none with the adapter disabled either); dpo, the control, runs one."""
    from oaif import train as train_module
    from oaif.config import LoraConfig

    passes = []
    real = train_module.reference_model

    def counted(policy, reference):
        passes.append(1)
        return real(policy, reference)

    monkeypatch.setattr(train_module, "reference_model", counted)
    pairs = [PreferencePair(0, 0, str(i), [], "a", "b", 0.9, [3, 4 + i], [5, 6 + i, 1], [7 + i, 8, 9, 1]) for i in range(2)]
    for loss in ("orpo", "simpo", "sft", "dpo"):
        cfg = TrainConfig(loss=loss, learning_rate=1e-3, batch_size=2, micro_batch_size=2,
                          lora=LoraConfig(enabled=lora, r=4, alpha=8))
        policy, reference = build_policy(str(tiny_model), "float32", "cpu", cfg)
        assert reference is None or (loss == "dpo" and not lora), (loss, lora)
        passes.clear()
        assert PreferenceTrainer(policy, reference, cfg, pad_id=0).train_round(pairs)["train/steps"] == 1
        assert (len(passes) > 0) == (loss == "dpo"), (loss, lora, len(passes))
