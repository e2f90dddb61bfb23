"""The pair losses a run trains with (`train.loss`), each saying what it needs.

oaif.losses holds the equations, as pure functions of per-sequence log-probs. A Loss here
adds what the trainer and the config must know about one: whether a reference model is
built and run, whether its log-probs are per-token means, which extra log-probs it takes
(KTO's step-wide reference point z0, RLOO's log-probs under the policy as the round
began), its papers' default β and the train.* settings that only it reads. LOSSES maps
each train.loss name to one.

This module imports no other oaif module but oaif.losses: oaif.config reads LOSSES to
check a config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oaif.losses import dpo_loss, ipo_loss, kto_loss, orpo_loss, rloo_loss, sft_loss, simpo_loss, slic_loss


@dataclass(frozen=True)
class Setting:
    """train.* keys that only some losses read. Set away from its default for another loss,
    it would silently do nothing, so the config refuses it."""
    keys: tuple[str, ...]
    hint: str = ""   # what to do, after the error

    def error(self, owners: list[str], loss: str) -> str:
        """The config error for this setting with train.loss `loss`, which is none of `owners`."""
        verb = "applies" if len(self.keys) == 1 else "apply"
        to = f"loss {owners[0]}" if len(owners) == 1 else f"{', '.join(owners[:-1])} and {owners[-1]}"
        return f"train.{' / '.join(self.keys)}: {verb} to {to} only, not {loss}{self.hint}"


MARGIN = Setting(("margin_scale",), "; remove it or set 0")
KTO_WEIGHTS = Setting(("kto_desirable_weight", "kto_undesirable_weight"))
SIMPO_GAMMA = Setting(("simpo_gamma",))
PPO_CLIP = Setting(("ppo_clip",))


@dataclass(frozen=True)
class PairLogps:
    """One micro-batch's per-sequence log-probs, each (B,): the policy's (pc, pr) and the
    reference's (rc, rr; None without a reference) for chosen and rejected, the annotator's
    P(chosen better), and what some losses take besides."""
    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor | None
    rr: torch.Tensor | None
    p_chosen: torch.Tensor
    weights: torch.Tensor | None = None   # per pair, 0 for padding; None: all 1
    z0: torch.Tensor | None = None        # kto: the step's reference point
    start: tuple[torch.Tensor, torch.Tensor] | None = None   # rloo: (chosen, rejected) as the round began


class Loss:
    """One train.loss: what it needs from the trainer, and its per-pair losses. A family's
    class states the facts in which it differs from these defaults."""
    default_beta: float                  # the papers' β, when train.beta is left empty
    needs_reference = True               # False: no reference model is built or run
    mean_logps = False                   # per-token mean log-probs (its equation's), not sums
    needs_reference_point = False        # kto: z0 over the whole optimizer step, before its passes
    needs_start_logps = False            # rloo: the log-probs under the policy as the round began
    settings: tuple[Setting, ...] = ()   # the train.* keys only this family reads

    def __call__(self, x: PairLogps, beta: float, cfg) -> torch.Tensor:
        """Per-pair losses (B,). cfg: the train section (oaif.config.TrainConfig), for the
        settings a loss reads."""
        raise NotImplementedError


# The OAIF paper's β (Guo et al. 2024, §4): DPO 0.1, IPO 1.0, SLiC 0.002. cDPO, the soft-label
# loss and KTO are DPO-shaped and keep DPO's 0.1.
class DPO(Loss):
    default_beta = 0.1
    settings = (MARGIN,)

    def smoothing(self, x: PairLogps, cfg) -> torch.Tensor | float:
        return 0.0

    def __call__(self, x: PairLogps, beta: float, cfg) -> torch.Tensor:
        margin = cfg.margin_scale * (2 * x.p_chosen - 1)
        return dpo_loss(x.pc, x.pr, x.rc, x.rr, beta, smoothing=self.smoothing(x, cfg), margin=margin)


class ConservativeDPO(DPO):
    def smoothing(self, x: PairLogps, cfg) -> float:
        return cfg.label_smoothing   # ε: the probability that a label is flipped


class SoftDPO(DPO):
    def smoothing(self, x: PairLogps, cfg) -> torch.Tensor:
        return 1 - x.p_chosen   # the annotator's probability is the target


class IPO(Loss):
    default_beta = 1.0

    def __call__(self, x: PairLogps, beta: float, cfg) -> torch.Tensor:
        return ipo_loss(x.pc, x.pr, x.rc, x.rr, beta)


class SLiC(Loss):
    default_beta = 0.002

    def __call__(self, x: PairLogps, beta: float, cfg) -> torch.Tensor:
        return slic_loss(x.pc, x.pr, x.rc, x.rr, beta)


class KTO(Loss):
    """Chosen responses are desirable, rejected undesirable; the reference point is the mean
    log-ratio (both were sampled from the policy: a KL estimate)."""
    default_beta = 0.1
    needs_reference_point = True
    settings = (KTO_WEIGHTS,)

    def __call__(self, x: PairLogps, beta: float, cfg) -> torch.Tensor:
        """z0 None: these pairs' own weighted mean log-ratio."""
        policy, ref = torch.cat([x.pc, x.pr]), torch.cat([x.rc, x.rr])
        w = torch.ones_like(policy) if x.weights is None else torch.cat([x.weights, x.weights])
        desirable = torch.arange(len(policy), device=policy.device) < len(x.pc)
        z0 = ((policy - ref) * w).sum() / w.sum().clamp(min=1) if x.z0 is None else x.z0
        per_response = kto_loss(policy, ref, desirable, beta, z0, cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
        return (per_response[:len(x.pc)] + per_response[len(x.pc):]) / 2


class ReferenceFree(Loss):
    """A loss of the policy's log-probs alone (rc, rr are None), per-token means as in its
    equation."""
    needs_reference = False
    mean_logps = True


class ORPO(ReferenceFree):
    default_beta = 0.1   # ORPO's β is its λ, the odds-ratio term's weight (Hong et al. 2024)

    def __call__(self, x: PairLogps, beta: float, cfg) -> torch.Tensor:
        return orpo_loss(x.pc, x.pr, beta)


class SimPO(ReferenceFree):
    default_beta = 2.0   # Meng et al. 2024
    settings = (SIMPO_GAMMA,)

    def __call__(self, x: PairLogps, beta: float, cfg) -> torch.Tensor:
        return simpo_loss(x.pc, x.pr, beta, cfg.simpo_gamma)


class SFT(ReferenceFree):
    default_beta = 1.0   # sft has no β: it only scales the logged rewards

    def __call__(self, x: PairLogps, beta: float, cfg) -> torch.Tensor:
        return sft_loss(x.pc)


class RLOO(Loss):
    default_beta = 0.05   # the KL penalty's coefficient
    needs_start_logps = True
    settings = (PPO_CLIP,)

    def __call__(self, x: PairLogps, beta: float, cfg) -> torch.Tensor:
        return rloo_loss(x.pc, x.pr, *x.start, x.rc, x.rr, x.p_chosen, beta, cfg.ppo_clip)


# In train.loss's order, which is the order of the config's errors.
LOSSES: dict[str, Loss] = {
    "dpo": DPO(), "cdpo": ConservativeDPO(), "soft": SoftDPO(), "ipo": IPO(), "slic": SLiC(), "kto": KTO(),
    "orpo": ORPO(), "simpo": SimPO(), "sft": SFT(), "rloo": RLOO(),
}

# Each loss-specific setting with the losses that read it: the config refuses it for the others.
SETTING_OWNERS: dict[Setting, list[str]] = {
    setting: [name for name, loss in LOSSES.items() if setting in loss.settings]
    for family in LOSSES.values() for setting in family.settings
}
