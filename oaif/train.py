"""Online DPO update: the policy (trained) against a frozen reference (the policy at run start).

Sequences are the exact token ids vLLM sampled (prompt + response, EOS included when the
model stopped), so nothing is re-tokenized between sampling and training.

With LoRA and a fresh adapter the reference is the same model with the adapter disabled
(no second copy in memory). A run that starts from a trained adapter keeps a frozen copy of
base+adapter instead, because "adapter disabled" would then be the base model, not the
policy the run started from. A round's reference log-probs are computed for all its pairs
before its first step, without gradients (train.reference_batch_size pairs per pass), and
read from there by every step. The reference-free losses (orpo, simpo, sft) have no
reference at all: none is built, and no reference pass is run.

Under `accelerate launch` every rank holds the policy (wrapped by the chosen engine: DDP,
FSDP or DeepSpeed) and trains on its share of each optimizer step's pairs. Shares are
padded to equal length with weight-0 copies, because every rank must run the same number
of forward/backward passes (each backward is a collective); the loss is scaled so the
averaged gradient equals one process's gradient over the whole step.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from dataclasses import dataclass

import torch

from oaif.config import RunStopped, TrainConfig
from oaif.faults import crash_point
from oaif.models import DTYPES, disable_dropout, load_causal_lm, resolve_dtype
from oaif.losses import rewards
from oaif.objectives import LOSSES, PairLogps
from oaif.records import PreferencePair

MAX_SKIPPED_IN_A_ROW = 3


def build_policy(path: str, dtype: str, device: str, cfg: TrainConfig,
                 resume_from: str | None = None) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(trainable policy, frozen reference or None when the reference is 'adapter disabled'
    or the loss is reference-free).

    Trained weights are float32 whatever `dtype` is (master weights: in bfloat16 an update
    of lr≈1e-6 on a weight of 0.05 rounds away to nothing); the forward passes run in
    `dtype` under autocast. Frozen weights (the reference, a LoRA base) stay in `dtype`;
    peft keeps LoRA adapters in float32 on a bfloat16 base.

    resume_from: a checkpoint's policy/ folder (full weights or adapter) to continue from;
    the reference stays the run's starting policy."""
    lora = cfg.lora
    full_weights = resume_from if resume_from and not lora.enabled else path
    model = load_causal_lm(full_weights, dtype if lora.enabled else "float32", trainable=not lora.enabled,
                           device=device)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        # Non-reentrant: gradients reach the LoRA adapters without the inputs requiring grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference_free = not LOSSES[cfg.loss].needs_reference
    if not lora.enabled:
        return model, None if reference_free else load_causal_lm(path, dtype, trainable=False, device=device)
    from peft import PeftModel

    reference = None   # a fresh adapter: "adapter disabled" is the starting policy
    if lora.adapter and not reference_free:
        reference = PeftModel.from_pretrained(copy.deepcopy(model), lora.adapter).merge_and_unload()
        reference.eval().requires_grad_(False)
    if lora.adapter or resume_from:
        policy = PeftModel.from_pretrained(model, resume_from or lora.adapter, is_trainable=True)
    else:
        policy = lora_model(model, lora.r, lora.alpha, lora.dropout, lora.target_modules, "CAUSAL_LM")
    # The base was loaded frozen, in eval mode; LoRA dropout and gradient checkpointing act only in train mode.
    return policy.train(), reference


def lora_model(model: torch.nn.Module, r: int, alpha: int, dropout: float, target_modules, task_type: str):
    """A fresh peft LoRA adapter on model (the policy's, task CAUSAL_LM; a reward model's, SEQ_CLS)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                            target_modules=list(target_modules), task_type=task_type))


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


def pair_lengths(pair: PreferencePair) -> tuple[int, int]:
    """Tokens of prompt + chosen and prompt + rejected: the two rows the pair adds to a batch."""
    prompt = len(pair.prompt_token_ids)
    return prompt + len(pair.chosen_token_ids), prompt + len(pair.rejected_token_ids)


def padded_length(pair: PreferencePair) -> int:
    """The width the pair pads a batch to: its longer row (chosen and rejected share one batch)."""
    return max(pair_lengths(pair))


def by_length(pairs: list[PreferencePair], weights: list[float]) -> tuple[list[PreferencePair], list[float]]:
    """pairs and their weights, longest first: consecutive micro-batches then pad only to
    similar lengths. Longest first, so that a micro-batch too large for memory fails on the
    first pass."""
    order = sorted(range(len(pairs)), key=lambda i: padded_length(pairs[i]), reverse=True)
    return [pairs[i] for i in order], [weights[i] for i in order]


def sequence_logps(model: torch.nn.Module, input_ids, attention_mask, loss_mask,
                   length_normalize: bool = False) -> torch.Tensor:
    """Summed (or mean) log-probs of the masked (response) tokens, shape (B,).

    Logits at position t predict token t+1, so the mask is shifted by one. Two savings, the
    same values up to float rounding: the model computes logits only from the batch's first
    response token's predictor on (`logits_to_keep`: the LM head never runs over the
    prompts), and a token's log-prob is its logit minus the log-sum-exp of its row, so no
    (B, T, V) log-softmax tensor is made and kept for the backward pass.
    """
    first = max(1, int(loss_mask.argmax(-1).min()))   # the earliest response token in the batch
    # The predicting positions as indices, not a count: the LM head then gets a contiguous copy
    # of their hidden states. A count slices a strided view of them, which torch multiplies by
    # the (vocab x hidden) head through a batched product with the head's weight copied once
    # per sequence when the head is frozen (LoRA): on SmolLM2 under bf16 autocast, 1.24x the
    # time of a plain full log-softmax pass before, 1.02x now (scripts/bench_logps.py --lora).
    positions = torch.arange(first - 1, input_ids.shape[1] - 1, device=input_ids.device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions,
                   use_cache=False).logits.float()   # no KV cache: nothing generates from this pass
    targets = input_ids[:, first:]
    mask = loss_mask[:, first:]
    token_logps = logits.gather(2, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if length_normalize else total


@contextlib.contextmanager
def reference_model(policy: torch.nn.Module, reference: torch.nn.Module | None):
    """The model to run as the reference: the frozen copy, or (None: a fresh LoRA adapter,
    whose base is the reference) the policy itself with its adapter disabled."""
    if reference is not None:
        yield reference
        return
    with policy.disable_adapter():
        yield policy


@torch.no_grad()
def response_kl(policy: torch.nn.Module, reference: torch.nn.Module | None, prompts: list[list[int]],
                responses: list[list[int]], pad_id: int, micro_batch: int = 4) -> list[float]:
    """Per response: Σ_t KL(π(·|x, y<t) ‖ π_ref(·|x, y<t)) over its tokens, in nats.

    With y sampled from π this is the sequence-level KL(π ‖ π_ref) estimate with the exact
    per-token divergence in place of a single-sample log-ratio; with greedy responses it is
    the divergence along the policy's greedy path. reference None: the policy with its LoRA
    adapter disabled (a fresh adapter's reference)."""
    device = next(policy.parameters()).device
    out = []
    for s in range(0, len(prompts), micro_batch):
        ids, mask, loss_mask = (t.to(device) for t in
                                batch_sequences(prompts[s:s + micro_batch], responses[s:s + micro_batch], pad_id))
        logp = policy(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        with reference_model(policy, reference) as ref:
            logr = ref(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        per_token = (logp.exp() * (logp - logr)).sum(-1)
        out += (per_token * loss_mask[:, 1:]).sum(-1).tolist()
    return out


def lr_lambda(cfg: TrainConfig, total_steps: int, anchor: tuple[int, float] | None = None):
    """Linear warm-up, then constant, linear decay or cosine decay to 0 at total_steps.
    anchor (step, scale): a run extended at `step` decays from the scale it had there to 0 at
    the new total_steps, in the same shape, instead of jumping to the new horizon's value."""
    start, top = anchor or (cfg.warmup_steps, 1.0)

    def scale(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, max(0, step - start) / max(1, total_steps - start))
        return top * (1.0 - progress if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))
    return scale


@dataclass
class StepStats:
    """Pair-weighted sums of one round's training metrics (padding pairs weigh 0), and the
    padded and all positions of the batches its training passes ran on."""
    sums: dict
    n: float = 0.0
    padded: int = 0
    positions: int = 0

    def add(self, weights: torch.Tensor, **values: torch.Tensor) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach().float() * weights).sum().item()
        self.n += weights.sum().item()

    def add_batch(self, pairs: list[PreferencePair]) -> None:
        """A training pass's batch: its 2·len(pairs) rows, each padded to the longest."""
        lengths = [n for p in pairs for n in pair_lengths(p)]
        self.positions += len(lengths) * max(lengths)
        self.padded += len(lengths) * max(lengths) - sum(lengths)

    def means(self, accelerator=None) -> dict[str, float]:
        """The metrics' pair-weighted means, and padding_share: padded / all positions."""
        keys = sorted(self.sums)
        totals = torch.tensor([self.sums[k] for k in keys] + [self.padded, self.positions, self.n], dtype=torch.float64)
        if accelerator is not None:  # every rank saw only its share of the pairs
            totals = accelerator.reduce(totals.to(accelerator.device), "sum").cpu()
        return {**{k: (totals[i] / totals[-1]).item() for i, k in enumerate(keys)},
                "padding_share": (totals[-3] / totals[-2]).item()}


def rank_share(batch: list, rank: int, world: int) -> tuple[list, list[float]]:
    """This rank's pairs of an optimizer step and their weights: an interleaved slice padded
    to ceil(len/world) with weight-0 copies, so every rank runs the same passes."""
    share = batch[rank::world]
    size = -(-len(batch) // world)
    return share + [batch[0]] * (size - len(share)), [1.0] * len(share) + [0.0] * (size - len(share))


def step_shares(pairs: list[PreferencePair], batch_size: int, rank: int, world: int,
                bucket_by_length: bool) -> list[tuple[list[PreferencePair], list[float], int]]:
    """Per optimizer step of batch_size pairs: this rank's pairs (rank_share), their weights and
    the step's pair count; each share longest first when bucketing (the step's gradient is the
    same sum in any order)."""
    steps = []
    for s in range(0, len(pairs), batch_size):
        batch = pairs[s:s + batch_size]
        share, weights = rank_share(batch, rank, world)
        steps.append((*(by_length(share, weights) if bucket_by_length else (share, weights)), len(batch)))
    return steps


def parameter_hash(model: torch.nn.Module) -> str:
    """sha256 of the trainable parameters' bytes: equal on every rank iff the replicas are."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class PreferenceTrainer:
    """Trains the policy on judged pairs with the configured loss (train.loss, an
    oaif.objectives.Loss), which says which log-probs it needs beside the policy's."""

    def __init__(self, policy: torch.nn.Module, reference: torch.nn.Module | None, cfg: TrainConfig, pad_id: int,
                 total_steps: int = 0, accelerator=None, compute_dtype: str = "float32"):
        self.cfg, self.pad_id, self.accelerator = cfg, pad_id, accelerator
        self.compute_dtype = DTYPES[resolve_dtype(compute_dtype)]
        self.objective = LOSSES[cfg.loss]
        self.beta = self.objective.default_beta if cfg.beta is None else cfg.beta
        optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        # `policy` is the plain model (saved, synced); `model` runs the training passes
        # (the engine's wrapper under accelerate). The scheduler is stepped here once per
        # optimizer step, so it is not handed to accelerate (which would step it per rank).
        self.policy, self.model, self.optimizer = policy, policy, optimizer
        if accelerator is not None:
            from accelerate.utils import DistributedType

            if accelerator.distributed_type == DistributedType.DEEPSPEED:  # no DataLoader to infer it from
                accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
            self.model, self.optimizer = accelerator.prepare(policy, optimizer)
            self.policy = accelerator.unwrap_model(self.model)
        if cfg.compile:
            # The training passes only (the no-grad passes run the plain model). dynamic: one
            # graph for the micro-batches' many lengths, not one compilation per shape.
            self.model = torch.compile(self.model, dynamic=True)
        self.reference = reference
        self.reference_free = not self.objective.needs_reference   # no reference pass
        self.length_normalize = cfg.length_normalize or self.objective.mean_logps
        self.total_steps, self.anchor = total_steps, None   # the schedule's horizon (checkpointed)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_steps))
        self.steps = 0
        self.version = 0   # rounds trained: the policy version the engine is told at a sync
        self.skipped_in_a_row = 0   # optimizer steps skipped for non-finite gradients, consecutively
        self.replica_hashes: list[tuple[int, list[str]]] = []   # (step, every rank's parameter_hash): check_replicas
        # id(pair) -> log-probs of (chosen, rejected) this round: under the reference, and (rloo)
        # under the policy as it was before the round's first step.
        self._reference_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._start_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _batch(self, pairs: list[PreferencePair]) -> list[torch.Tensor]:
        """Chosen and rejected as one batch: (chosen..., rejected...)."""
        prompts = [p.prompt_token_ids for p in pairs] * 2
        responses = [p.chosen_token_ids for p in pairs] + [p.rejected_token_ids for p in pairs]
        device = next(self.policy.parameters()).device
        return [t.to(device) for t in batch_sequences(prompts, responses, self.pad_id)]

    def _autocast(self):
        device = next(self.policy.parameters()).device
        return torch.autocast(device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)

    def score_round(self, pairs: list[PreferencePair]) -> None:
        """Before a round's first step: its pairs' (this rank's) log-probs under the reference
        and (rloo) under the policy as the round began, which its steps then read."""
        self._reference_cache, self._start_cache = {}, {}
        if not self.reference_free:
            self._score_fixed(self._reference_cache, reference_model(self.policy, self.reference), pairs)
        if self.objective.needs_start_logps:   # rloo: PPO's ratio is taken against the policy that sampled
            self._score_fixed(self._start_cache, contextlib.nullcontext(self.policy), pairs)

    def _score_fixed(self, cache: dict, model, pairs: list[PreferencePair]) -> None:
        """Fill cache with each pair's (chosen, rejected) log-probs under a model that does not
        change during the round (the frozen reference; rloo: the policy as the round began),
        before its first step: every step, epoch and KTO's z0 pass then reads them. No gradient,
        so passes of reference_batch_size pairs, longest first (each pads to similar lengths).
        The plain model runs them, outside the engine's wrapper (nothing to synchronise)."""
        size = self.cfg.reference_batch_size or self.cfg.micro_batch_size
        ordered = sorted(pairs, key=padded_length, reverse=True)
        with torch.no_grad(), self._autocast(), model as m:
            for s in range(0, len(ordered), size):
                chunk = ordered[s:s + size]
                logps = sequence_logps(m, *self._batch(chunk), self.length_normalize)
                for k, p in enumerate(chunk):
                    cache[id(p)] = (logps[k], logps[len(chunk) + k])

    @staticmethod
    def _cached(cache: dict, pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) log-probs of pairs, each (B,), from a cache _score_fixed filled."""
        return torch.stack([cache[id(p)][0] for p in pairs]), torch.stack([cache[id(p)][1] for p in pairs])

    def _forward(self, pairs: list[PreferencePair]):
        """The policy's log-probs of chosen and rejected, in one forward pass together, and the
        reference's from the round's cache. Reference-free losses: the reference's are None."""
        batch, n = self._batch(pairs), len(pairs)
        with self._autocast():
            policy = sequence_logps(self.model, *batch, self.length_normalize)
        ref = (None, None) if self.reference_free else self._cached(self._reference_cache, pairs)
        return policy[:n], policy[n:], *ref

    def loss(self, pc, pr, rc, rr, p_chosen: torch.Tensor, weights: torch.Tensor | None = None,
             z0: torch.Tensor | None = None, start: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Per-pair losses (B,) for the configured loss. KTO: z0, the step's reference point
        (reference_point); None: these pairs' own weighted mean log-ratio. rloo: start,
        the (chosen, rejected) log-probs under the policy as the round began."""
        return self.objective(PairLogps(pc, pr, rc, rr, p_chosen, weights, z0, start), self.beta, self.cfg)

    def train_round(self, pairs: list[PreferencePair], on_step=None) -> dict[str, float]:
        """epochs_per_round passes over the pairs, in optimizer steps of batch_size pairs.
        Under accelerate every rank calls this with the same pairs and trains on its share.
        on_step: called after each step (taken or skipped), for progress."""
        cfg, stats, acc = self.cfg, StepStats({}), self.accelerator
        norms, skipped = [], 0
        rank, world = (acc.process_index, acc.num_processes) if acc else (0, 1)
        steps = step_shares(pairs, cfg.batch_size, rank, world, cfg.bucket_by_length)
        self.score_round([p for share, _, _ in steps for p in share])   # equal counts on every rank: equal passes
        for _ in range(cfg.epochs_per_round):
            for share, weights, step_pairs in steps:
                self.optimizer.zero_grad(set_to_none=True)
                z0 = self.reference_point(share, weights) if self.objective.needs_reference_point else None
                micros = range(0, len(share), cfg.micro_batch_size)
                for m in micros:
                    micro = share[m:m + cfg.micro_batch_size]
                    # Gradients are averaged across ranks once per step, on the last pass.
                    last = m == micros[-1]
                    with contextlib.nullcontext() if acc is None or last else acc.no_sync(self.model):
                        pc, pr, rc, rr = self._forward(micro)
                        stats.add_batch(micro)
                        w = torch.tensor(weights[m:m + cfg.micro_batch_size], device=pc.device)
                        p_chosen = torch.tensor([p.p_chosen for p in micro], device=pc.device)
                        start = self._cached(self._start_cache, micro) if self.objective.needs_start_logps else None
                        losses = self.loss(pc, pr, rc, rr, p_chosen, w, z0, start)
                        # Scaled so the rank-averaged, accumulated gradient is the mean over the step's pairs.
                        loss = (losses * w).sum() * world / step_pairs
                        loss.backward() if acc is None else acc.backward(loss)
                    if self.reference_free:
                        # SimPO's reward β·(mean per-token log-prob) (Meng et al. 2024, Eq. 4) for
                        # both; no KL: there is no reference to measure it against.
                        chosen_r, rejected_r, kl = (self.beta * pc).detach(), (self.beta * pr).detach(), {}
                    else:
                        chosen_r, rejected_r = rewards(pc, pr, rc, rr, self.beta)
                        # Both responses were sampled from the policy, so the mean
                        # log-ratio is a Monte-Carlo estimate of KL(πθ || π0).
                        kl = {"kl_to_ref": (pc + pr - rc - rr) / 2}
                    stats.add(w, loss=losses, reward_accuracy=(chosen_r > rejected_r).float(),
                              reward_margin=chosen_r - rejected_r, rewards_chosen=chosen_r,
                              rewards_rejected=rejected_r, logps_chosen=pc, logps_rejected=pr, **kl)
                # The norm before clipping (max_grad_norm 0: measured, not clipped). Gradients are
                # averaged across ranks by now, so every rank sees the same norm and decides alike.
                clip = torch.nn.utils.clip_grad_norm_ if acc is None else acc.clip_grad_norm_
                norm = clip(self.model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
                if on_step is not None:
                    on_step()
                if norm is not None:   # None: DeepSpeed clips inside its own step
                    if not math.isfinite(float(norm)):
                        self.skip_step()
                        skipped += 1
                        continue
                    norms.append(float(norm))
                self.skipped_in_a_row = 0
                self.optimizer.step()
                self.scheduler.step()
                self.steps += 1
                crash_point("train")
                if cfg.check_replicas:
                    self.check_replicas()
        self._reference_cache, self._start_cache = {}, {}
        self.version += 1
        return {**{f"train/{k}": v for k, v in stats.means(acc).items()},
                "train/grad_norm": sum(norms) / len(norms) if norms else None, "train/skipped_steps": skipped,
                "train/steps": self.steps, "train/learning_rate": self.scheduler.get_last_lr()[0]}

    @torch.no_grad()
    def reference_point(self, share: list[PreferencePair], weights: list[float]) -> torch.Tensor:
        """KTO's z0 for one optimizer step: the weighted mean log-ratio over every response of
        the step on every rank, from a forward pass without gradients before the step's
        passes, so it depends neither on micro_batch_size nor on the number of processes."""
        acc, mbs = self.accelerator, self.cfg.micro_batch_size
        total = torch.zeros(2, device=next(self.policy.parameters()).device)
        for m in range(0, len(share), mbs):
            pc, pr, rc, rr = self._forward(share[m:m + mbs])
            w = torch.tensor(weights[m:m + mbs], device=pc.device)
            total += torch.stack([(((pc - rc) + (pr - rr)) * w).sum().float(), 2 * w.sum()])
        if acc is not None and acc.num_processes > 1:
            total = acc.reduce(total, reduction="sum")
        return total[0] / total[1].clamp(min=1)

    def skip_step(self) -> None:
        """A step whose gradients are not finite changes nothing (a NaN would reach every weight
        and the engine); several in a row stop the run, with the weights from before them."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise RunStopped(
                f"{self.skipped_in_a_row} optimizer steps in a row had non-finite gradients (NaN or inf) and were "
                f"skipped; the policy holds the weights from before them. Lower train.learning_rate or check the "
                f"model's dtype, then resume from the last checkpoint (oaif resume RUN_DIR)")

    def check_replicas(self) -> None:
        """Record every rank's parameter hash for this step; stop if they differ."""
        mine = parameter_hash(self.policy)
        hashes = [mine]
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            import torch.distributed as dist

            hashes = [None] * self.accelerator.num_processes
            dist.all_gather_object(hashes, mine)
        self.replica_hashes.append((self.steps, hashes))
        if len(set(hashes)) > 1:
            # Every rank holds the gathered hashes, so every rank stops here together (no hang).
            raise RunStopped(f"train.check_replicas: the ranks' parameters differ after optimizer step {self.steps} "
                             f"(hashes {hashes}); this round's weights are not trusted and no checkpoint is written "
                             f"for it. Resume from the last checkpoint (oaif resume RUN_DIR)")
