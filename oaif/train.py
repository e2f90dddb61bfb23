"""Online DPO update: policy (trained) vs a frozen reference (the policy at run start).

Sequences are the exact token ids vLLM sampled (prompt + response, EOS included when the
model stopped), so nothing is re-tokenized between sampling and training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from oaif.config import TrainConfig, beta_for
from oaif.losses import LOSSES, rewards
from oaif.records import PreferencePair

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_causal_lm(path: str, dtype: str, trainable: bool, device: str = "cpu") -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(resolve_device(device))
    model.train(trainable)  # the frozen reference stays in eval mode (no dropout)
    model.requires_grad_(trainable)
    return model


def batch_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Right-padded (input_ids, attention_mask, loss_mask), each (B, T).

    loss_mask is 1 on response tokens only: prompt and padding never count.
    """
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r)
        attention_mask[i, :n] = 1
        loss_mask[i, len(p):n] = 1.0
    return input_ids, attention_mask, loss_mask


def sequence_logps(model: torch.nn.Module, input_ids, attention_mask, loss_mask) -> torch.Tensor:
    """Summed log-probs of the masked (response) tokens, shape (B,).

    Logits at position t predict token t+1, so the mask is shifted by one.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * loss_mask[:, 1:]).sum(-1)


@dataclass
class StepStats:
    loss: float = 0.0
    accuracy: float = 0.0
    margin: float = 0.0
    chosen_reward: float = 0.0
    rejected_reward: float = 0.0
    logps_chosen: float = 0.0
    logps_rejected: float = 0.0
    kl: float = 0.0
    n: int = 0

    def add(self, pairs: int, **means: float) -> None:
        for k, v in means.items():
            setattr(self, k, getattr(self, k) + v * pairs)
        self.n += pairs

    def means(self) -> dict[str, float]:
        return {k: getattr(self, k) / self.n for k in self.__dataclass_fields__ if k != "n"}


class DPOTrainer:
    def __init__(self, policy: torch.nn.Module, reference: torch.nn.Module, cfg: TrainConfig, pad_id: int):
        self.policy, self.reference, self.cfg, self.pad_id = policy, reference, cfg, pad_id
        self.beta = beta_for(cfg)
        self.loss_fn = LOSSES[cfg.loss]
        self.optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.steps = 0

    def _forward(self, pairs: list[PreferencePair]):
        """Chosen and rejected go through one forward pass each for policy and reference."""
        prompts = [p.prompt_token_ids for p in pairs] * 2
        responses = [p.chosen_token_ids for p in pairs] + [p.rejected_token_ids for p in pairs]
        device = next(self.policy.parameters()).device
        batch = [t.to(device) for t in batch_sequences(prompts, responses, self.pad_id)]
        policy = sequence_logps(self.policy, *batch)
        with torch.no_grad():
            ref = sequence_logps(self.reference, *batch)
        n = len(pairs)
        return policy[:n], policy[n:], ref[:n], ref[n:]

    def train_round(self, pairs: list[PreferencePair]) -> dict[str, float]:
        """epochs_per_round passes over the pairs, in optimizer steps of batch_size pairs."""
        cfg, stats = self.cfg, StepStats()
        for _ in range(cfg.epochs_per_round):
            for start in range(0, len(pairs), cfg.batch_size):
                batch = pairs[start:start + cfg.batch_size]
                self.optimizer.zero_grad(set_to_none=True)
                for m in range(0, len(batch), cfg.micro_batch_size):
                    micro = batch[m:m + cfg.micro_batch_size]
                    pc, pr, rc, rr = self._forward(micro)
                    losses = self.loss_fn(pc, pr, rc, rr, self.beta)
                    # Scale so the accumulated gradient is the mean over the whole step's batch.
                    (losses.sum() / len(batch)).backward()
                    chosen_r, rejected_r = rewards(pc, pr, rc, rr, self.beta)
                    stats.add(len(micro), loss=losses.mean().item(),
                              accuracy=(chosen_r > rejected_r).float().mean().item(),
                              margin=(chosen_r - rejected_r).mean().item(),
                              chosen_reward=chosen_r.mean().item(), rejected_reward=rejected_r.mean().item(),
                              logps_chosen=pc.mean().item(), logps_rejected=pr.mean().item(),
                              # Both responses were sampled from the policy, so the mean
                              # log-ratio is a Monte-Carlo estimate of KL(πθ || π0).
                              kl=((pc + pr - rc - rr) / 2).mean().item())
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.steps += 1
        m = stats.means()
        return {
            "train/loss": m["loss"], "train/reward_accuracy": m["accuracy"], "train/reward_margin": m["margin"],
            "train/rewards_chosen": m["chosen_reward"], "train/rewards_rejected": m["rejected_reward"],
            "train/logps_chosen": m["logps_chosen"], "train/logps_rejected": m["logps_rejected"],
            "train/kl_to_ref": m["kl"], "train/steps": self.steps,
            "train/steps_this_round": cfg.epochs_per_round * math.ceil(len(pairs) / cfg.batch_size),
        }
