"""Direct-alignment losses as pure functions of per-sequence log-probs.

All inputs have shape (B,): summed response-token log-probs of the policy (pc, pr) and the
frozen reference (rc, rr) for the chosen and rejected responses. With
    h = (pc - rc) - (pr - rr) = log[ πθ(y+) π0(y−) / (π0(y+) πθ(y−)) ]
the OAIF paper (Guo et al. 2024, §3) compares:
    DPO   −log σ(β h)               (Rafailov et al. 2023, Eq. 7)
    IPO   (h − 1/(2β))²             (Azar et al. 2023, Eq. 17)
    SLiC  max(0, 1 − β h)           (Zhao et al. 2023, hinge on the log-ratio)
Each returns per-pair losses (B,); the implicit rewards β(pc − rc), β(pr − rr) are
computed once by `rewards` for metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_ratio_margin(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    return (pc - rc) - (pr - rr)


def dpo_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    return -F.logsigmoid(beta * log_ratio_margin(pc, pr, rc, rr))


def ipo_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    return (log_ratio_margin(pc, pr, rc, rr) - 1.0 / (2.0 * beta)) ** 2


def slic_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    return torch.relu(1.0 - beta * log_ratio_margin(pc, pr, rc, rr))


LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "slic": slic_loss}


def rewards(pc, pr, rc, rr, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards β·log(πθ/π0) of chosen and rejected, detached, shape (B,)."""
    return (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()
