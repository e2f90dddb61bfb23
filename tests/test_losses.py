import math

import torch

from oaif.losses import dpo_loss, ipo_loss, rewards, slic_loss
from oaif.train import batch_sequences, sequence_logps

# One pair: policy chosen/rejected -10/-12, reference -11/-11, so h = (−10+11) − (−12+11) = 2.
PC, PR, RC, RR = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))


def test_dpo_matches_hand_computed():
    # −log σ(0.1·2) = log(1 + e^−0.2)
    assert math.isclose(dpo_loss(PC, PR, RC, RR, 0.1).item(), math.log(1 + math.exp(-0.2)), rel_tol=1e-6)


def test_ipo_matches_hand_computed():
    # (2 − 1/(2·1))² = 2.25
    assert math.isclose(ipo_loss(PC, PR, RC, RR, 1.0).item(), 2.25, rel_tol=1e-6)


def test_slic_matches_hand_computed():
    assert math.isclose(slic_loss(PC, PR, RC, RR, 0.002).item(), 1 - 0.004, rel_tol=1e-6)
    assert slic_loss(PC, PR, RC, RR, 1.0).item() == 0.0  # margin 2 > 1: hinge inactive


def test_rewards_are_beta_scaled_log_ratios():
    chosen, rejected = rewards(PC, PR, RC, RR, 0.1)
    assert math.isclose(chosen.item(), 0.1, rel_tol=1e-6) and math.isclose(rejected.item(), -0.1, rel_tol=1e-6)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    dpo_loss(pc, pr, RC, RR, 0.1).sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token distribution at every position is softmax([0, log 3]):
    token 0 has p=1/4, token 1 has p=3/4, whatever the input."""

    def forward(self, input_ids, attention_mask, logits_to_keep=0, use_cache=False):   # as transformers reads logits_to_keep
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = torch.tensor([0.0, math.log(3.0)]).expand(*input_ids.shape, 2)[:, keep]
        return type("Out", (), {"logits": logits})()


def test_sequence_logps_counts_only_response_tokens():
    # Prompt [1, 1, 1] (any tokens), response [0, 1]; a second row has a shorter prompt and padding.
    ids, attn, mask = batch_sequences([[1, 1, 1], [1]], [[0, 1], [1]], pad_id=0)
    assert ids.tolist() == [[1, 1, 1, 0, 1], [1, 1, 0, 0, 0]]
    assert mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 0, 0, 0]]
    logps = sequence_logps(FixedLogits(), ids, attn, mask)
    # Row 0: log(1/4) + log(3/4); row 1: log(3/4) only (prompt and padding masked).
    assert torch.allclose(logps, torch.tensor([math.log(0.25) + math.log(0.75), math.log(0.75)]), atol=1e-6)


def test_cdpo_and_soft_label_match_hand_computed():
    # ε = 0.1: −0.9·log σ(0.2) − 0.1·log σ(−0.2)
    expected = -0.9 * math.log(1 / (1 + math.exp(-0.2))) - 0.1 * math.log(1 / (1 + math.exp(0.2)))
    assert math.isclose(dpo_loss(PC, PR, RC, RR, 0.1, smoothing=0.1).item(), expected, rel_tol=1e-6)
    # The soft-label loss −p·log σ(βh) − (1−p)·log σ(−βh) is cDPO with ε = 1 − p (a tensor, one per
    # pair); p = 0.75, written out with plain floats.
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    p = 0.75
    soft = -p * math.log(sigmoid(0.1 * 2)) - (1 - p) * math.log(sigmoid(-0.1 * 2))
    assert math.isclose(dpo_loss(PC, PR, RC, RR, 0.1, smoothing=1 - torch.tensor([p])).item(), soft, rel_tol=1e-6)


def test_margin_is_subtracted_inside_the_sigmoid():
    # margin 0.5: −log σ(0.2 − 0.5) = log(1 + e^0.3)
    assert math.isclose(dpo_loss(PC, PR, RC, RR, 0.1, margin=0.5).item(), math.log(1 + math.exp(0.3)), rel_tol=1e-6)


def test_kto_matches_hand_computed():
    from oaif.losses import kto_loss

    policy, ref = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -11.0])   # log-ratios +1, −1
    desirable = torch.tensor([True, False])
    z0 = torch.tensor(0.25)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    out = kto_loss(policy, ref, desirable, beta=0.5, kl=z0, weight_desirable=1.0, weight_undesirable=2.0)
    assert torch.allclose(out, torch.tensor([1 - sig(0.5 * (1 - 0.25)), 2 * (1 - sig(0.5 * (0.25 + 1)))]), atol=1e-6)
    # A negative KL estimate is clamped to 0.
    out0 = kto_loss(policy, ref, desirable, beta=0.5, kl=torch.tensor(-3.0))
    assert math.isclose(out0[0].item(), 1 - sig(0.5), rel_tol=1e-6)


def test_length_normalised_logps_are_means():
    ids, attn, mask = batch_sequences([[1, 1, 1]], [[0, 1]], pad_id=0)
    mean = sequence_logps(FixedLogits(), ids, attn, mask, length_normalize=True)
    assert math.isclose(mean.item(), (math.log(0.25) + math.log(0.75)) / 2, rel_tol=1e-6)


def test_lr_schedule_warms_up_then_decays():
    from oaif.config import TrainConfig
    from oaif.train import lr_lambda

    f = lr_lambda(TrainConfig(warmup_steps=4, lr_schedule="linear"), total_steps=14)
    assert [round(f(s), 3) for s in (0, 3, 4, 9, 14)] == [0.25, 1.0, 1.0, 0.5, 0.0]
    c = lr_lambda(TrainConfig(lr_schedule="cosine"), total_steps=10)
    assert math.isclose(c(5), 0.5, abs_tol=1e-9) and c(10) < 1e-9


# Reference-free losses take the policy's mean per-token log-probs. Chosen: p = 1/2 (odds 1,
# log odds 0); rejected: p = 1/5 (odds (1/5)/(4/5) = 1/4, log odds −log 4).
MC, MR = torch.tensor([math.log(1 / 2)]), torch.tensor([math.log(1 / 5)])


def test_orpo_matches_hand_computed():
    from oaif.losses import orpo_loss

    # L_SFT = −log(1/2) = log 2;  L_OR = −log σ(0 − (−log 4)) = log(1 + 1/4);  λ = 0.1
    assert math.isclose(orpo_loss(MC, MR, 0.1).item(), math.log(2) + 0.1 * math.log(1.25), rel_tol=1e-6)
    # λ = 0: plain SFT on the chosen response.
    assert math.isclose(orpo_loss(MC, MR, 0.0).item(), math.log(2), rel_tol=1e-6)


def test_orpo_log_odds_are_stable_at_both_ends():
    from oaif.losses import log_odds, orpo_loss

    # p = e^−60: log odds = −60 − log(1 − e^−60) = −60 to float precision (the log1p branch);
    # p = 1 − 1e-5: log((1 − 1e-5)/1e-5) = log 99999 (the expm1 branch; 1 − e^log p in float32
    # is ~1e-3 off here).
    got = log_odds(torch.tensor([-60.0, math.log(1 - 1e-5)]))
    assert torch.allclose(got, torch.tensor([-60.0, math.log(99999.0)]), rtol=0, atol=1e-4)
    # A response the model is certain of (log p = 0, infinite odds) keeps a finite loss and gradient.
    pc = torch.tensor([0.0], requires_grad=True)
    loss = orpo_loss(pc, MR, 0.1)
    loss.backward()
    assert math.isfinite(loss.item()) and math.isfinite(pc.grad.item())


def test_simpo_matches_hand_computed():
    from oaif.losses import simpo_loss

    # β = 2, γ = 1: −log σ(2·(log(1/2) − log(1/5)) − 1) = −log σ(2 log 2.5 − 1) = log(1 + e^(1 − 2 log 2.5))
    #   = log(1 + e/6.25)
    assert math.isclose(simpo_loss(MC, MR, 2.0, 1.0).item(), math.log(1 + math.e / 6.25), rel_tol=1e-6)
    # γ = 2 log 2.5: the margin exactly met, −log σ(0) = log 2.
    assert math.isclose(simpo_loss(MC, MR, 2.0, 2 * math.log(2.5)).item(), math.log(2), rel_tol=1e-6)


def test_reference_free_gradients_raise_chosen_and_lower_rejected():
    from oaif.losses import orpo_loss, simpo_loss

    for loss in (lambda c, r: orpo_loss(c, r, 0.1), lambda c, r: simpo_loss(c, r, 2.0, 1.0)):
        pc, pr = MC.clone().requires_grad_(), MR.clone().requires_grad_()
        loss(pc, pr).sum().backward()
        assert pc.grad.item() < 0 < pr.grad.item()


def test_sft_is_the_chosen_response_nll():
    from oaif.losses import sft_loss

    pc = MC.clone().requires_grad_()
    loss = sft_loss(pc)
    loss.sum().backward()
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6) and pc.grad.item() == -1.0


def test_rloo_is_reinforce_with_the_other_sample_as_baseline_and_a_clipped_ratio():
    from oaif.losses import rloo_loss

    p = torch.tensor([0.75])
    # π_old = π (the first step on the samples): ratio 1. Rewards 0.75 and 0.25 minus β times
    # each one's log-ratio to the reference (+1 and −1): A = (0.75 − 0.25) − 0.05·(1 − (−1)) = 0.4.
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    loss = rloo_loss(pc, pr, PC, PR, RC, RR, p, beta=0.05, clip=0.2)
    loss.sum().backward()
    # −(1·A) and −(1·(−A)), averaged: 0; the gradient is REINFORCE's, −A/2 and +A/2.
    assert abs(loss.item()) < 1e-7
    assert math.isclose(pc.grad.item(), -0.2, rel_tol=1e-5) and math.isclose(pr.grad.item(), 0.2, rel_tol=1e-5)
    # The chosen response already 1.5× likelier than under π_old: its ratio is clipped at 1.2
    # (A > 0), so it gets no gradient; the rejected one (ratio 1) still does.
    pc = (PC + math.log(1.5)).requires_grad_()
    pr = PR.clone().requires_grad_()
    loss = rloo_loss(pc, pr, PC, PR, RC, RR, p, beta=0.05, clip=0.2)
    loss.sum().backward()
    assert math.isclose(loss.item(), (-1.2 * 0.4 + 0.4) / 2, rel_tol=1e-5)
    assert pc.grad.item() == 0.0 and math.isclose(pr.grad.item(), 0.2, rel_tol=1e-5)
    # A sure annotator and no KL gap give the largest advantage; a coin flip gives none.
    half = rloo_loss(PC.clone().requires_grad_(), PR, PC, PR, RC, RC, torch.tensor([0.5]), 0.05, 0.2)
    assert half.item() == 0.0
