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
Each returns per-pair losses (B,).
"""

from __future__ import annotations

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


def rewards(pc, pr, rc, rr, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards β·log(πθ/π0) of chosen and rejected, detached, shape (B,)."""
    return (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()
