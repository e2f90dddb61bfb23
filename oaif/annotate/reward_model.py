"""The `reward_model` backend: a Bradley-Terry reward model from `oaif train-rm` as the judge.

Each response gets one score r, and P(first better) = σ(r_first − r_second). A judge() call
scores each distinct (conversation, response) once, so the two orders of a pair cost one
forward pass per response, not two judge prompts. The answer is exactly antisymmetric:
P(a, b) = 1 − P(b, a), so the orders always agree.

The model learned what "better" means from the pairs it was trained on; it reads no
constitution, principles or template, and its identity carries none (their hashes are
empty), so editing the constitution changes nothing it says.
"""

from __future__ import annotations

import json
import math

import torch

from oaif.annotate.base import Answer, Identity, JudgeRequest, render_conversation
from oaif.config import ConfigError
from oaif.models import DTYPES, check_model, disable_dropout, load_tokenizer, resolve_device, resolve_dtype
from oaif.records import Message
from oaif.train import batch_sequences


def preference(r1: float, r2: float) -> float | None:
    """σ(r1 − r2); None when a score is not finite. Computed from the non-negative difference,
    so that preference(r2, r1) is exactly 1 − preference(r1, r2) (r1 − r2 is exactly
    −(r2 − r1) in floating point, and 1 − p is exact for p in [0.5, 1])."""
    d = r1 - r2
    if not math.isfinite(d):
        return None
    if d < 0:
        return 1.0 - preference(r2, r1)
    return 1.0 / (1.0 + math.exp(-d))


def check_reward_model(path: str, key: str) -> None:
    """Fail before the run, naming the config key, on a folder that is not a reward model
    (e.g. the policy: its new score head would judge at random)."""
    from transformers import AutoConfig

    check_model(path, key)
    config = AutoConfig.from_pretrained(path)
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []) or config.num_labels != 1:
        raise ConfigError(f"{key}: {path} is not a reward model (a sequence-classification model with one output); "
                          f"train one with: oaif train-rm PAIRS CONFIG --out DIR")


def encode(tokenizer, messages: list[Message], response: str) -> list[int]:
    """The token ids the reward model reads for (conversation, response), in training and in
    scoring alike: the response as the assistant's turn of the tokenizer's chat template, or,
    for a tokenizer without one, the plain conversation text ('User: ...\\nAssistant: ...')."""
    turns = messages + [{"role": "assistant", "content": response}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(turns, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]   # the template writes its own
    return tokenizer(render_conversation(turns))["input_ids"]


def rewards(model: torch.nn.Module, sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """r of each sequence, shape (B,). Right-padded: the head reads the last token that is not
    padding (the model's config.pad_token_id, set to pad_id when the model is built)."""
    # batch_sequences pads prompt+response pairs; here the whole sequence is the "prompt".
    ids, mask, _ = batch_sequences(sequences, [[] for _ in sequences], pad_id)
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()


@torch.no_grad()
def score(model: torch.nn.Module, sequences: list[list[int]], pad_id: int, batch_size: int) -> list[float]:
    """r of each sequence, batch_size sequences per forward pass."""
    out = []
    for s in range(0, len(sequences), batch_size):
        out += rewards(model, sequences[s:s + batch_size], pad_id).tolist()
    return out


def load_reward_model(path: str, dtype: str, device: str, pad_id: int) -> torch.nn.Module:
    """A one-output sequence-classification model: a trained reward model, or a causal LM whose
    new score head starts at random. Dropout off, so training and scoring see one function."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=DTYPES[resolve_dtype(dtype)])
    model.config.pad_token_id = pad_id   # how the head finds each sequence's last token
    disable_dropout(model)
    return model.to(resolve_device(device))


class RewardModelAnnotator:
    def __init__(self, model: str, dtype: str, device: str, batch_size: int, max_tokens: int):
        self.path, self.batch_size, self.max_tokens = model, batch_size, max_tokens
        self.tokenizer = load_tokenizer(model)
        self.model = load_reward_model(model, dtype, device, self.tokenizer.pad_token_id)
        self.stats: dict[str, float] = {"requests": 0, "scored": 0, "tokens": 0}

    @property
    def identity(self) -> Identity:
        return Identity("reward_model", self.path, "", "", "")

    def judge(self, requests: list[JudgeRequest]) -> list[Answer]:
        # Each distinct (conversation, response) once: the b-first order reuses the a-first scores.
        keys = list(dict.fromkeys((json.dumps(r.messages), text) for r in requests for text in (r.first, r.second)))
        ids = {k: encode(self.tokenizer, json.loads(k[0]), k[1]) for k in keys}
        fits = [k for k in keys if len(ids[k]) <= self.max_tokens]   # counted invalid, never truncated
        scores = dict(zip(fits, score(self.model, [ids[k] for k in fits], self.tokenizer.pad_token_id,
                                      self.batch_size)))
        self.stats["requests"] += len(requests)
        self.stats["scored"] += len(fits)
        self.stats["tokens"] += sum(len(ids[k]) for k in fits)
        answers = []
        for r in requests:
            first, second = (scores.get((json.dumps(r.messages), text)) for text in (r.first, r.second))
            if first is None or second is None:
                answers.append(Answer(None, f"a response has more than annotate.max_prompt_tokens="
                                            f"{self.max_tokens} tokens with its conversation"))
                continue
            answers.append(Answer(preference(first, second), f"reward_1={first:.6g} reward_2={second:.6g}"))
        return answers
