"""`oaif sft`: supervised fine-tuning, the warm start a policy gets before the loop.

    oaif sft DATA CONFIG [key=value ...] --out DIR [--overwrite]

DATA holds a prompt and the response to learn per row, in TRL's SFT formats:
  - {"messages": [...]}: a chat whose last turn is the assistant's (the response);
  - {"prompt": ..., "completion": ...} (or "response"): the prompt as text or chat messages,
    the completion as text or one assistant message;
as a JSONL file, or a dataset (a .parquet or .csv file, a save_to_disk folder, a folder of
data files) read as datasets_io reads prompt sets.

The prompt is rendered as the loop renders its prompts (the chat template and the assistant
turn opener: generate.encode_prompt) and the response is its tokens plus EOS, the tokens the
loop's engine would sample. The loss is the mean negative log-likelihood of the response
tokens only: the prompt is masked out, and EOS is learned, so the policy learns where to stop.
Settings are in `sft:` (oaif config-help); full weights, or a LoRA adapter (train.lora.*)
merged into the saved model. DIR gets the model in Hugging Face format and sft_metrics.jsonl
(one line per optimizer step), written whole (built beside DIR, then renamed; DIR is new, or
with --overwrite an earlier oaif model: oaif/outputs.py); the loop
starts from it with policy.model=DIR. `oaif init-tiny` builds the embedded tiny policy with
this same training (tiny.py).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from oaif import outputs
from oaif.config import RunConfig, SFTConfig
from oaif.datasets_io import DATA_FILES, dataset_rows, row_messages, row_response
from oaif.generate import encode_prompt
from oaif.models import DTYPES, check_model, load_tokenizer, resolve_dtype
from oaif.records import is_chat, read_jsonl, write_jsonl
from oaif.train import batch_sequences, build_policy, sequence_logps

Example = tuple[list[int], list[int]]   # (prompt token ids, response token ids ending with EOS)


def run_sft(cfg: RunConfig, data: str | Path, out: str | Path, log=print, overwrite: bool = False) -> Path:
    """policy.model fine-tuned on `data`, saved to `out`: the whole `oaif sft` command."""
    out = Path(out)
    outputs.check(out, "model", folder=True, overwrite=overwrite)   # before any work: a mistaken --out is named at once
    check_model(cfg.policy.model, "policy.model")
    tokenizer = load_tokenizer(cfg.policy.model, cfg.policy.chat_template)   # a base model may go without one
    examples = load_examples(data, tokenizer, cfg.sft, log)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)   # a fresh LoRA adapter's initial weights
    # build_policy's second value, the frozen reference of a DPO run, is not needed: dropped at once.
    policy = build_policy(cfg.policy.model, cfg.policy.dtype, cfg.policy.device, cfg.train)[0]
    kind = f"a LoRA adapter (r={cfg.train.lora.r})" if cfg.train.lora.enabled else "full weights"
    log(f"sft: {len(examples)} rows of {data}, {kind} of {cfg.policy.model}")
    history = train_sft(policy, tokenizer.pad_token_id, examples, cfg, log)
    if cfg.train.lora.enabled:   # one plain model that vLLM and from_pretrained load by path
        policy = policy.merge_and_unload()
    save_sft(policy, tokenizer, out, history, overwrite=overwrite)
    log(f"sft: saved to {out}; start the loop from it with policy.model={out}")
    return out


def load_examples(data: str | Path, tokenizer, cfg: SFTConfig, log=print) -> list[Example]:
    """The rows of `data` as token ids; rows over cfg.max_tokens are left out (counted). A bad
    row is an error naming it, and so is a set with no row to train on."""
    path = Path(data)
    if path.is_file() and path.suffix not in DATA_FILES:
        rows, where = read_jsonl(path), lambda n: f"{path}:{n}"
    elif path.exists():
        rows, _ = dataset_rows(path, "oaif sft", cfg.split, "set sft.split")
        where = lambda n: f"{path} row {n}"  # noqa: E731
    else:
        raise FileNotFoundError(f"SFT data {path} not found; give a JSONL file, a .parquet or .csv file or a "
                                f"dataset folder")
    if not rows:
        raise ValueError(f"{path}: no rows; an SFT set needs rows of 'messages' (ending with the assistant's turn) "
                         f"or 'prompt' and 'completion'")
    examples = [_example(row, where(n), tokenizer) for n, row in enumerate(rows, 1)]
    lengths = [len(p) + len(r) for p, r in examples]
    too_long = [n for n, length in enumerate(lengths, 1) if length > cfg.max_tokens]
    if len(too_long) == len(examples):
        shortest = min(lengths)
        raise ValueError(f"{path}: every row is longer than sft.max_tokens={cfg.max_tokens} tokens (prompt + "
                         f"response + EOS; the shortest has {shortest}); raise sft.max_tokens")
    if too_long:
        log(f"sft: left out {len(too_long)} of {len(examples)} rows longer than sft.max_tokens={cfg.max_tokens} "
            f"(rows {', '.join(map(str, too_long[:10]))}{', ...' if len(too_long) > 10 else ''})")
    return [e for e, length in zip(examples, lengths) if length <= cfg.max_tokens]


def _example(row, where: str, tokenizer) -> Example:
    """One row as (prompt ids, response ids + EOS)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'messages', or 'prompt' and 'completion'")
    if "messages" in row:
        messages = row["messages"]
        if not (is_chat(messages) and len(messages) >= 2):
            raise ValueError(f"{where}: 'messages' must be a list of at least two {{role, content}} messages: "
                             f"the prompt, then the assistant's response")
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: 'messages' ends with a '{messages[-1]['role']}' turn; the last turn must be "
                             f"the assistant's response to learn")
        prompt, response = messages[:-1], messages[-1]["content"]
    else:
        key = "completion" if "completion" in row else "response"
        if "prompt" not in row or key not in row:
            raise ValueError(f"{where}: no response: expected 'messages' (ending with the assistant's turn) or "
                             f"'prompt' with 'completion' (or 'response'); the row has {', '.join(row) or 'no keys'}")
        prompt, response = row_messages(row, where), row_response(row[key])
    if not isinstance(response, str) or not response.strip():
        raise ValueError(f"{where}: the response is empty or not text; fill it in or remove the row")
    if tokenizer.chat_template is not None:
        prompt_ids = encode_prompt(tokenizer, prompt)
    elif len(prompt) == 1 and prompt[0]["role"] == "user":
        # No chat template (a base model): the prompt's text as it is, TRL's plain prompt-completion form.
        prompt_ids = tokenizer(prompt[0]["content"])["input_ids"]
    else:
        raise ValueError(f"{where}: the tokenizer has no chat template, so the prompt must be one text, not a "
                         f"conversation")
    if not prompt_ids:
        raise ValueError(f"{where}: the prompt is empty; give the text the response answers")
    return prompt_ids, tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def lr_scale(cfg: SFTConfig, steps: int, step: int) -> float:
    """Linear warm-up over warmup_steps, times a linear decay toward 0 at `steps`, floored at
    min_lr_ratio."""
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return warmup * max(cfg.min_lr_ratio, 1 - step / max(steps, 1))


def response_nll(policy: torch.nn.Module, examples: list[Example], pad_id: int) -> torch.Tensor:
    """Summed negative log-likelihood of the examples' response tokens (EOS included); the
    prompt and the padding are masked out."""
    device = next(policy.parameters()).device
    batch = batch_sequences([p for p, _ in examples], [r for _, r in examples], pad_id)
    return -sequence_logps(policy, *(t.to(device) for t in batch)).sum()


def train_sft(policy: torch.nn.Module, pad_id: int, examples: list[Example], cfg: RunConfig, log=print) -> list[dict]:
    """Trains `policy` in place on the examples; one metrics dict per optimizer step."""
    s = cfg.sft
    per_epoch = -(-len(examples) // s.batch_size)
    steps = s.epochs * per_epoch if s.max_steps is None else s.max_steps
    size = min(s.batch_size, len(examples))
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_scale(s, steps, step))
    device_type = next(policy.parameters()).device.type
    dtype = DTYPES[resolve_dtype(cfg.policy.dtype)]
    rng = random.Random(cfg.seed)
    policy.train()
    history, t0 = [], time.perf_counter()
    for step in range(steps):
        # Rows drawn afresh each step, not shuffled passes: the draws init-tiny's warm-up always
        # made, so the tiny policy (and every number measured on it) stays what it was.
        batch = rng.sample(examples, size)
        tokens = sum(len(r) for _, r in batch)
        optimizer.zero_grad()
        loss_sum = 0.0
        for m in range(0, size, s.micro_batch_size):
            with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
                # Over the whole step's response tokens, so accumulated micro-batches give the step's mean.
                loss = response_nll(policy, batch[m:m + s.micro_batch_size], pad_id) / tokens
            loss.backward()
            loss_sum += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm if s.max_grad_norm > 0 else math.inf)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        history.append({"step": step + 1, "epoch": (step + 1) * size / len(examples), "loss": loss_sum,
                        "learning_rate": lr, "grad_norm": float(norm), "tokens": tokens,
                        "seconds": time.perf_counter() - t0})
        if (step + 1) % per_epoch == 0 or step in (0, steps - 1):
            recent = history[-per_epoch:]   # about one epoch: a single step's loss is noisy
            log(f"sft: step {step + 1}/{steps} epoch {history[-1]['epoch']:.1f} loss "
                f"{sum(h['loss'] for h in recent) / len(recent):.3f} (steps {recent[0]['step']}-{step + 1}) "
                f"lr {lr:.2e} ({history[-1]['seconds']:.0f}s)")
    return history


def save_sft(model: torch.nn.Module, tokenizer, out: str | Path, history: list[dict], overwrite: bool = False,
             parents: bool = False) -> Path:
    """The model and tokenizer in Hugging Face format with sft_metrics.jsonl, written whole:
    built in a folder beside `out`, then renamed, so a crash leaves no half model
    (oaif/outputs.py; parents: make missing parent folders)."""
    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_jsonl(staging / "sft_metrics.jsonl", history)

    return outputs.write_folder(out, "model", fill, overwrite=overwrite, parents=parents)
