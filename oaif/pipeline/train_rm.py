"""`oaif train-rm`: a Bradley-Terry reward model trained on collected preference pairs.

    oaif train-rm PAIRS CONFIG [key=value ...] --out DIR [--overwrite]

A reward model reads (prompt, response) and returns one number r; P(y_w better than y_l) is
modelled as σ(r_w − r_l) (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022, eq. 1). It
is a transformers sequence-classification model with one output on any causal LM
(`reward_model.model`, empty: the policy's starting model), trained whole or as a LoRA
adapter plus the score head (PERL, Sidahmed et al. 2024). Once trained it judges a pair with
one forward pass per response instead of a judge prompt per order: the `reward_model`
annotator backend (annotate/reward_model.py) makes it a cheap judge for `oaif run`.

PAIRS is a pair file in any format `oaif offline` reads (oaif pair records, `oaif annotate`
output, prompt/chosen/rejected rows, also as parquet or a save_to_disk folder), or a run
directory (runs/NAME: every kept pair of every round). A seeded share of the pairs
(`reward_model.heldout_fraction`) is held out; its accuracy is reported after every epoch.
DIR gets the model in Hugging Face format (a LoRA adapter merged in), its tokenizer, and
metrics.json (sizes, per-epoch train and held-out loss and accuracy, the settings). DIR is
new (or with --overwrite an earlier oaif model) and written whole: built in a hidden folder
beside it, then renamed (oaif/outputs.py).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from oaif import outputs
from oaif.annotate.reward_model import encode, load_reward_model, rewards, score
from oaif.config import RunConfig, to_dict
from oaif.datasets_io import PAIR_FIELDS, load_pairs, run_pairs
from oaif.models import check_model, load_tokenizer
from oaif.losses import bradley_terry_loss
from oaif.records import PreferencePair
from oaif.rundir import is_run_dir
from oaif.train import lora_model


def read_pairs(source: str | Path, tokenizer, max_prompt_tokens: int) -> tuple[list[PreferencePair], dict]:
    """(pairs, skipped rows by reason) from a run directory's rounds or a pair file (`oaif offline`'s reader)."""
    source = Path(source)
    if not is_run_dir(source):
        return load_pairs(source, tokenizer, max_prompt_tokens)
    pairs = [PreferencePair(**{k: pair[k] for k in PAIR_FIELDS}) for pair, _ in run_pairs(source)]
    if not pairs:
        raise ValueError(f"{source}: the run kept no pairs yet; give a run with kept pairs or a pair file")
    return pairs, {}


def split(items: list, fraction: float, seed: int, what: str) -> tuple[list, list]:
    """(training, held-out): a seeded shuffle, then round(fraction · n) held out."""
    order = items[:]
    random.Random(seed).shuffle(order)
    held = round(len(order) * fraction)
    if held < 1 or held >= len(order):
        raise ValueError(f"{what}: {len(order)} usable pairs are too few to hold out "
                         f"reward_model.heldout_fraction={fraction} of them ({held} held out, {len(order) - held} "
                         f"to train on); collect more pairs or change reward_model.heldout_fraction")
    return order[held:], order[:held]


def evaluate(model: torch.nn.Module, data: list[tuple], pad_id: int, batch_size: int) -> dict[str, float]:
    """Mean loss and accuracy (r_chosen > r_rejected) over (chosen ids, rejected ids, margin) triples."""
    chosen = torch.tensor(score(model, [c for c, _, _ in data], pad_id, batch_size))
    rejected = torch.tensor(score(model, [r for _, r, _ in data], pad_id, batch_size))
    margin = torch.tensor([m for _, _, m in data])
    return {"loss": bradley_terry_loss(chosen, rejected, margin).mean().item(),
            "accuracy": (chosen > rejected).float().mean().item()}


def train_reward_model(cfg: RunConfig, source: str | Path, out: str | Path, log=print,
                       overwrite: bool = False) -> dict:
    """Train on the pairs of `source`, save the model and metrics.json into `out` (a new
    folder, or with overwrite an earlier oaif model: oaif/outputs.py); the metrics."""
    rm, out, t0 = cfg.reward_model, Path(out), time.perf_counter()
    outputs.check(out, "model", folder=True, overwrite=overwrite)   # before any work
    base = rm.model or cfg.policy.model
    check_model(base, "reward_model.model" if rm.model else "policy.model")
    tokenizer = load_tokenizer(base)
    pad_id = tokenizer.pad_token_id
    pairs, skipped = read_pairs(source, tokenizer, rm.max_tokens)
    data = []   # (chosen ids, rejected ids, margin)
    for p in pairs:
        chosen, rejected = encode(tokenizer, p.messages, p.chosen), encode(tokenizer, p.messages, p.rejected)
        if max(len(chosen), len(rejected)) > rm.max_tokens:
            skipped["too_long"] = skipped.get("too_long", 0) + 1
            continue
        data.append((chosen, rejected, rm.margin_scale * (2 * p.p_chosen - 1)))
    train, held = split(data, rm.heldout_fraction, cfg.seed, str(source))
    log(f"train-rm: {len(data)} pairs from {source} ({len(train)} to train on, {len(held)} held out; "
        f"skipped: {skipped}); base {base}{' with LoRA' if rm.lora else ''}")

    torch.manual_seed(cfg.seed)   # the new score head's initial weights
    model = load_reward_model(base, "float32", cfg.policy.device, pad_id)
    if rm.lora:
        # SEQ_CLS: peft trains the score head whole beside the adapters (modules_to_save).
        model = lora_model(model, rm.lora_r, rm.lora_alpha, 0.0, rm.lora_target_modules, "SEQ_CLS")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rm.learning_rate)
    rng, epochs = random.Random(cfg.seed), []
    for epoch in range(rm.epochs):
        rng.shuffle(train)
        loss_sum = correct = 0.0
        for s in range(0, len(train), rm.batch_size):
            batch = train[s:s + rm.batch_size]
            # Chosen and rejected in one forward pass.
            both = rewards(model, [c for c, _, _ in batch] + [r for _, r, _ in batch], pad_id)
            chosen, rejected = both[:len(batch)], both[len(batch):]
            losses = bradley_terry_loss(chosen, rejected, torch.tensor([m for _, _, m in batch], device=both.device))
            optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
            optimizer.step()
            loss_sum += losses.sum().item()
            correct += (chosen > rejected).sum().item()
        heldout = evaluate(model, held, pad_id, rm.batch_size)
        # Train figures are running means over the epoch's steps (the weights moved meanwhile).
        epochs.append({"epoch": epoch + 1, "train_loss": loss_sum / len(train), "train_accuracy": correct / len(train),
                       "heldout_loss": heldout["loss"], "heldout_accuracy": heldout["accuracy"]})
        log(f"train-rm: epoch {epoch + 1}/{rm.epochs}: train loss {loss_sum / len(train):.4f} accuracy "
            f"{correct / len(train):.3f}; held-out loss {heldout['loss']:.4f} accuracy {heldout['accuracy']:.3f}")

    final = evaluate(model, train, pad_id, rm.batch_size)
    metrics = {"source": str(source), "base_model": base, "pairs": len(data), "train_pairs": len(train),
               "heldout_pairs": len(held), "skipped": skipped, "train_accuracy": final["accuracy"],
               "train_loss": final["loss"], "heldout_accuracy": epochs[-1]["heldout_accuracy"],
               "heldout_loss": epochs[-1]["heldout_loss"], "epochs": epochs,
               "seconds": time.perf_counter() - t0, "seed": cfg.seed, "config": to_dict(rm)}
    if rm.lora:
        model = model.merge_and_unload()   # a plain model that loads by path, score head included

    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    outputs.write_folder(out, "model", fill, overwrite=overwrite)
    log(f"train-rm: held-out accuracy {metrics['heldout_accuracy']:.3f} on {len(held)} pairs "
        f"(train {metrics['train_accuracy']:.3f}); saved to {out} ({metrics['seconds']:.0f}s)")
    return metrics
