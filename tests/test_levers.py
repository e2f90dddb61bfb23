"""The trainer's speed levers change the cost of a step, not the step: length-bucketed
micro-batches (train.bucket_by_length), the reference's passes batched before the round
(train.reference_batch_size) and a compiled training forward (train.compile) give the
weights of the plain path, to float rounding; train/padding_share reports what padding costs."""

import math

import pytest
import torch
from test_trainer_wiring import norm, trained

from oaif.config import LoraConfig, TrainConfig
from oaif.models import load_causal_lm
from oaif.records import PreferencePair
from oaif.train import PreferenceTrainer, batch_sequences, build_policy, by_length, sequence_logps


def pair(i: int, prompt: int, chosen: int, rejected: int) -> PreferencePair:
    """Pair i with responses of these lengths, its own tokens and its own P(chosen better)."""
    tokens = lambda n, at: [3 + (at + 7 * i + k) % 60 for k in range(n)]   # noqa: E731
    return PreferencePair(0, 0, str(i), [], "a", "b", 0.55 + 0.07 * i, tokens(prompt, 0), tokens(chosen, 20),
                          tokens(rejected, 40))


# Six pairs of mixed lengths in an order that bucketing changes: unsorted, passes of 2 mix
# short and long pairs.
MIXED = [pair(0, 3, 2, 4), pair(1, 2, 12, 9), pair(2, 4, 3, 1), pair(3, 3, 10, 14), pair(4, 1, 2, 2), pair(5, 5, 8, 6)]


def test_by_length_keeps_each_pairs_weight_with_it():
    """Longest pair first (its longer row, prompt + response); the weights (0: a padding pair
    under a multi-process launch) move with their pairs."""
    weights = [1.0, 0.0, 0.5, 0.25, 2.0, 3.0]
    pairs, moved = by_length(MIXED, weights)
    assert [p.prompt_id for p in pairs] == ["3", "1", "5", "0", "2", "4"]   # 17, 14, 13, 7, 7, 3 tokens
    assert moved == [weights[int(p.prompt_id)] for p in pairs]


@pytest.mark.parametrize("loss, settings", [("dpo", {"margin_scale": 0.5}),   # margin: each pair's p_chosen counts
                                            ("kto", {}), ("rloo", {})])
def test_bucketing_gives_the_same_steps(loss, settings, tiny_model):
    """batch_size 6 in passes of 2, two epochs (the second step from a policy that has moved
    away from the reference and from the round's start): bucketed by length or not, the same
    gradients and weights. Per-pair p_chosen (dpo's margin, rloo's reward), KTO's step-wide z0
    and rloo's log-probs as the round began stay with their pairs. Bucketing did change the
    passes: less padding."""
    runs = [trained(tiny_model, MIXED, loss=loss, learning_rate=1e-3, batch_size=6, micro_batch_size=2,
                    epochs_per_round=2, max_grad_norm=0, bucket_by_length=bucket, **settings)
            for bucket in (False, True)]
    (plain_metrics, plain_weights, plain_steps), (metrics, weights, steps) = runs
    assert len(steps) == len(plain_steps) == 2
    for grads, plain_grads in zip(steps, plain_steps):
        assert norm(plain_grads) > 1e-3
        grad_differ = max((grads[k] - plain_grads[k]).abs().max().item() for k in plain_grads)
        # Passes of other shapes round differently (measured up to 1.3e-6 of the norm: the LM head
        # multiplies a whole pass at once); a z0 taken per pass moves them 9e-3 (4e-5 of the norm).
        assert grad_differ < 1e-5 * norm(plain_grads), grad_differ
    # AdamW's first step is about lr·sign(g), so rounding shows where g is near its eps (as in
    # test_trainer_wiring's accumulation test); a pair lost or misweighted moves weights ~lr.
    differ = max((weights[k] - plain_weights[k]).abs().max().item() for k in plain_weights)
    assert differ < 1e-4, differ
    assert math.isclose(metrics["train/loss"], plain_metrics["train/loss"], rel_tol=1e-5, abs_tol=1e-6)
    assert metrics["train/padding_share"] < plain_metrics["train/padding_share"] - 0.1


def test_padding_share_is_the_training_passes_padding(tiny_model):
    """train/padding_share: the padded share of the positions the training passes (those with
    gradients) ran on, as the model saw them. Short (rows 4, 4) and long (rows 12, 10) pairs
    alternating, in passes of 2: unsorted every pass pads to 12, 18 of 48 positions padded
    (0.375); bucketed, the long pairs pad 4 of 48 and the short ones 0 of 16 (0.0625)."""
    short, long = (2, 2, 2), (2, 10, 8)
    pairs = [pair(i, *(long if i % 2 else short)) for i in range(4)]
    for bucket, want in ((False, 0.375), (True, 0.0625)):
        policy = load_causal_lm(str(tiny_model), "float32", trainable=True)
        reference = load_causal_lm(str(tiny_model), "float32", trainable=False)
        seen = []   # (padded, all) positions of every forward pass with gradients

        def count(_, args, kwargs):
            if torch.is_grad_enabled():
                mask = kwargs["attention_mask"]
                seen.append(((mask == 0).sum().item(), mask.numel()))

        policy.register_forward_pre_hook(count, with_kwargs=True)
        cfg = TrainConfig(batch_size=4, micro_batch_size=2, bucket_by_length=bucket)
        metrics = PreferenceTrainer(policy, reference, cfg, pad_id=0).train_round(pairs)
        assert len(seen) == 2
        assert metrics["train/padding_share"] == sum(p for p, _ in seen) / sum(n for _, n in seen) == want


def one_at_a_time(model, pairs) -> list[list[float]]:
    """Each pair's (chosen, rejected) log-probs, each sequence in a batch of its own."""
    with torch.no_grad():
        return [[sequence_logps(model, *batch_sequences([p.prompt_token_ids], [r], 0)).item()
                 for r in (p.chosen_token_ids, p.rejected_token_ids)] for p in pairs]


@pytest.mark.parametrize("loss", ["dpo", "rloo"])
def test_reference_batch_size_gives_the_same_log_probs_in_fewer_passes(loss, tiny_model, monkeypatch):
    """train.reference_batch_size: the round's reference log-probs (rloo: and those under the
    policy as the round began) are computed before its first step in ceil(pairs / size) passes
    (0: micro_batch_size, 2), equal to each sequence's log-prob scored alone, and the step's
    loss is the same at every size. The policy is moved away from the reference first, so that
    the two differ and a swap would show."""
    fill, filled = PreferenceTrainer._score_fixed, {}

    def keep(self, cache, model, pairs):
        fill(self, cache, model, pairs)
        name = "reference" if cache is self._reference_cache else "start"
        filled[name] = [[cache[id(p)][k].item() for k in (0, 1)] for p in MIXED]

    monkeypatch.setattr(PreferenceTrainer, "_score_fixed", keep)
    losses = []
    for size in (0, 1, 4, 16):
        policy = load_causal_lm(str(tiny_model), "float32", trainable=True)
        reference = load_causal_lm(str(tiny_model), "float32", trainable=False)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        want = {"reference": one_at_a_time(reference, MIXED), "start": one_at_a_time(policy, MIXED)}
        passes = []
        reference.register_forward_pre_hook(lambda *_: passes.append(1))
        cfg = TrainConfig(loss=loss, learning_rate=1e-3, batch_size=6, micro_batch_size=2, reference_batch_size=size)
        filled.clear()
        losses.append(PreferenceTrainer(policy, reference, cfg, pad_id=0).train_round(MIXED)["train/loss"])
        assert len(passes) == math.ceil(6 / (size or 2)), size
        assert set(filled) == ({"reference", "start"} if loss == "rloo" else {"reference"})
        for name, got in filled.items():
            assert torch.allclose(torch.tensor(got), torch.tensor(want[name]), atol=1e-5, rtol=1e-6), (size, name)
    assert max(losses) - min(losses) < 1e-5, losses


@pytest.mark.slow   # inductor's compilation took 1.5-4.5 minutes on the 2-core machine
def test_compiled_training_forward_gives_the_same_step(tiny_model):
    """train.compile: the training forward through torch.compile (dynamic shapes) gives the
    eager step's loss and weights, to float rounding, over two rounds of passes of several
    lengths. With LoRA, the harder case (peft's layers inside the graph; the reference pass
    disables the adapter on the plain model); full weights passed the same check when it was
    written, and are left out of the suite for the minutes a compilation takes. The compiled
    run did compile: dynamo counted the graphs it made."""
    lora = True
    from torch._dynamo.utils import counters

    cfg = dict(learning_rate=1e-3, batch_size=6, micro_batch_size=2, lora=LoraConfig(enabled=lora, r=4, alpha=8))
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)   # the same fresh LoRA adapter
        policy, reference = build_policy(str(tiny_model), "float32", "cpu", TrainConfig(**cfg))
        trainer = PreferenceTrainer(policy, reference, TrainConfig(**cfg, compile=compiled), pad_id=0)
        counters.clear()
        losses = [trainer.train_round(MIXED)["train/loss"] for _ in range(2)]
        assert (counters["stats"]["unique_graphs"] > 0) == compiled, dict(counters["stats"])
        runs.append((losses, {k: v.clone() for k, v in policy.state_dict().items()}))
    (eager_losses, eager_weights), (losses, weights) = runs
    assert losses == pytest.approx(eager_losses, abs=1e-5)
    assert eager_losses[1] < eager_losses[0]   # the second round saw trained weights
    differ = max((weights[k] - eager_weights[k]).abs().max().item() for k in eager_weights)
    assert differ < 1e-5, differ
