"""Builds the embedded tiny policy: a Llama-style model and a locally trained tokenizer.

    oaif init-tiny models/tiny

No model hub is needed: the tokenizer is a byte-level BPE trained on the bundled text,
the model is a 2-layer Llama (head_dim 64: vLLM's CPU attention rejects smaller heads),
and a short warm-up on prompts/tiny_sft.jsonl teaches it the chat format and to end its
answers (EOS) after 1 to 6 sentences, so two samples differ in length and a judge has
something to prefer. The result is saved in Hugging Face format and loaded by path with
from_pretrained / vllm.LLM, exactly like a hub model.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from oaif.train import batch_sequences, sequence_logps

SPECIAL = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Each turn is "<|role|>\ncontent<|end|>\n"; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DATA = Path(__file__).resolve().parent.parent / "prompts" / "tiny_sft.jsonl"


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=2048)


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation plus the assistant turn opener (the policy's input)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def init_tiny(out: str | Path, steps: int = 300, seed: int = 0, hidden: int = 128, layers: int = 2,
              vocab_size: int = 1024, log=print) -> Path:
    out = Path(out)
    torch.manual_seed(seed)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    texts = [m["content"] for r in rows for m in r["messages"]]
    tokenizer = build_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    data = [(encode_prompt(tokenizer, r["messages"][:1]),
             tokenizer(r["messages"][1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            for r in rows]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / max(steps, 1)))
    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = rng.sample(data, 32)
        ids, attn, mask = batch_sequences([p for p, _ in batch], [r for _, r in batch], tokenizer.pad_token_id)
        # Token-level SFT loss on the response (EOS included), prompt masked.
        loss = -sequence_logps(model, ids, attn, mask).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"init-tiny: warm-up step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"init-tiny: saved a {n_params / 1e6:.2f}M-parameter policy to {out}")
    return out
