"""Direct-alignment losses as pure functions of per-sequence log-probs.

Inputs have shape (B,): log-probs (summed, or length-normalised by the trainer) of the
policy (pc, pr) and the frozen reference (rc, rr) for the chosen and rejected responses.
With  h = (pc − rc) − (pr − rr) = log[ πθ(y+) π0(y−) / (π0(y+) πθ(y−)) ]  the OAIF paper
(Guo et al. 2024, §3) compares:
    DPO   −log σ(β h)                              (Rafailov et al. 2023, Eq. 7)
    IPO   (h − 1/(2β))²                            (Azar et al. 2023, Eq. 17)
    SLiC  max(0, 1 − β h)                          (Zhao et al. 2023, hinge on the log-ratio)
and the DPO family adds:
    cDPO  −(1−ε) log σ(βh) − ε log σ(−βh)          (conservative DPO, label smoothing ε)
    soft  −p log σ(βh) − (1−p) log σ(−βh)          (p = the annotator's P(chosen better))
    margin: DPO with −log σ(βh − m), m = scale·(2p − 1), the annotator's confidence as a
            margin, after Llama 2's margin on the reward-model ranking loss.
Two losses need no reference: with pc, pr the policy's mean per-token log-probs,
    ORPO  −pc − λ log σ(log odds(pc) − log odds(pr)),  log odds(ℓ) = ℓ − log(1 − e^ℓ)
                                                   (Hong et al. 2024, Eqs. 6-7)
    SimPO −log σ(β pc − β pr − γ)                  (Meng et al. 2024, Eq. 6)
    sft   −pc: the chosen response's mean per-token NLL alone (rejection-sampling
          fine-tuning on the annotator's best response: Llama 2's rejection sampling)
and one policy-gradient loss, on summed log-probs, with oc, or under the policy that sampled:
    rloo  REINFORCE with the other sample as baseline, PPO's clipped ratio and a KL penalty
          in the reward (see rloo_loss)
Each returns per-pair losses (B,). The reward model's loss (oaif train-rm) lives here too:
    Bradley–Terry  −log σ(r_w − r_l − m), on a reward head's scores
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def log_ratio_margin(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    return (pc - rc) - (pr - rr)


def dpo_loss(pc, pr, rc, rr, beta: float, smoothing: torch.Tensor | float = 0.0,
             margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """DPO; `smoothing` ε gives cDPO (or the soft-label loss with ε = 1 − p); `margin` m is
    subtracted from βh."""
    z = beta * log_ratio_margin(pc, pr, rc, rr) - margin
    return -(1.0 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z)


def ipo_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    return (log_ratio_margin(pc, pr, rc, rr) - 1.0 / (2.0 * beta)) ** 2


def slic_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    return torch.relu(1.0 - beta * log_ratio_margin(pc, pr, rc, rr))


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, beta: float,
             kl: torch.Tensor, weight_desirable: float = 1.0, weight_undesirable: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, Eq. 8) on unpaired responses, shape (N,).

    policy, ref: log-probs of each response; desirable: bool (N,); kl: the reference point
    z0, an estimate of KL(πθ‖π0) that gets no gradient.
        desirable:    λD (1 − σ(β(r − z0)))       undesirable:  λU (1 − σ(β(z0 − r)))
    with r = log πθ(y|x) − log π0(y|x).
    """
    r = policy - ref
    z0 = kl.detach().clamp(min=0)
    return torch.where(desirable, weight_desirable * (1 - torch.sigmoid(beta * (r - z0))),
                       weight_undesirable * (1 - torch.sigmoid(beta * (z0 - r))))


def log_odds(logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 − p)) from log p, with log(1 − p) computed stably (log1mexp: expm1 near
    p = 1, log1p elsewhere; Mächler 2012). log p is capped just below 0: a response the model
    is certain of has infinite odds, and its gradient would be NaN."""
    logp = logp.clamp(max=-1e-6)
    return logp - torch.where(logp > -math.log(2), torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


def orpo_loss(pc: torch.Tensor, pr: torch.Tensor, lam: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024, Eq. 6): L_SFT + λ L_OR, reference-free.

    pc, pr: the policy's mean per-token log-probs of chosen and rejected (the paper's
    length-normalised likelihood is P = e^pc). L_SFT = −pc, the chosen response's mean
    per-token NLL; L_OR = −log σ(log odds(y+) − log odds(y−)) (Eq. 7)."""
    return -pc - lam * F.logsigmoid(log_odds(pc) - log_odds(pr))


def simpo_loss(pc: torch.Tensor, pr: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024, Eq. 6): −log σ(β/|y+| log π(y+) − β/|y−| log π(y−) − γ),
    reference-free. pc, pr: the policy's mean per-token log-probs (log π(y)/|y|); γ: the
    target reward margin."""
    return -F.logsigmoid(beta * (pc - pr) - gamma)


def sft_loss(pc: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning on the chosen response: its mean per-token negative
    log-likelihood (pc: mean per-token log-probs). The rejected response is not used."""
    return -pc


def rloo_loss(pc, pr, oc, or_, rc, rr, p_chosen: torch.Tensor, beta: float, clip: float) -> torch.Tensor:
    """Policy gradient on a judged pair: REINFORCE with a leave-one-out baseline (RLOO,
    Ahmadian et al. 2024; with k = 2 samples the baseline of each is the other's reward),
    PPO's clipped ratio (Schulman et al. 2017, Eq. 7) and a KL penalty in the reward
    (Ziegler et al. 2019; InstructGPT's r − β log(π/π_ref)).

    pc, pr: the policy's summed log-probs; oc, or_: the same under the policy that sampled
    (π_old); rc, rr: under the reference. Each response's reward is the annotator's
    P(it is better), p for chosen and 1 − p for rejected, minus β (log π_old − log π_ref) of
    it; the chosen response's advantage is A = R_chosen − R_rejected, the rejected one's −A
    (no gradient through A). Per response −min(ρA, clip(ρ, 1 − ε, 1 + ε)A), ρ = π(y)/π_old(y)
    over the whole sequence; the pair's loss is the mean of its two. With ρ = 1 (the first
    step on a round's samples) the gradient is REINFORCE's, A ∇log π(y)."""
    advantage = ((2 * p_chosen - 1) - beta * ((oc - rc) - (or_ - rr))).detach()

    def clipped(logp, old, a):
        ratio = torch.exp(logp - old)
        return -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)

    return (clipped(pc, oc, advantage) + clipped(pr, or_, -advantage)) / 2


def rewards(pc, pr, rc, rr, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards β·log(πθ/π0) of chosen and rejected, detached, shape (B,)."""
    return (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Per-pair −log σ(r_w − r_l − m): InstructGPT eq. 1, with Llama 2's margin m (Touvron et al.
    2023, eq. 2), which asks a larger gap of pairs the annotator was surer about."""
    return -F.logsigmoid(chosen - rejected - margin)
