"""Builds the embedded tiny policy: a Llama-style model and a locally trained tokenizer.

    oaif init-tiny models/tiny [--overwrite]

No model hub is needed: the tokenizer is a byte-level BPE trained on the bundled text,
the model is a 2-layer Llama (head_dim 64: vLLM's CPU attention rejects smaller heads),
and a short warm-up on prompts/tiny_sft.jsonl (`oaif sft`'s training, sft.py) teaches it the
chat format and to end its answers (EOS) after 1 to 6 sentences, so two samples differ in
length and a judge has something to prefer. The result is saved in Hugging Face format and
loaded by path with from_pretrained / vllm.LLM, exactly like a hub model. DIR is new (its
missing parent folders are made: models/ in a fresh checkout), or with --overwrite an
earlier oaif model (oaif/outputs.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from oaif import outputs
from oaif.bundled import data_path
from oaif.config import PolicyConfig, RunConfig, SFTConfig
from oaif.records import read_jsonl
from oaif.pipeline.sft import load_examples, save_sft, train_sft

SPECIAL = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Each turn is "<|role|>\ncontent<|end|>\n"; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DATA = data_path("tiny_sft")


def build_tokenizer(texts: list[str], vocab_size: int):
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=2048)


def init_tiny(out: str | Path, steps: int = 300, seed: int = 0, hidden: int = 128, layers: int = 2,
              vocab_size: int = 1024, log=print, overwrite: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    outputs.check(out, "model", folder=True, overwrite=overwrite, parents=True)   # before the warm-up
    torch.manual_seed(seed)
    rows = read_jsonl(DATA)
    texts = [m["content"] for r in rows for m in r["messages"]]
    tokenizer = build_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # The warm-up the tiny policy has always had (the tests and the README's numbers rest on
    # it): 32 rows a step, AdamW at 3e-3 with torch's default weight decay, 20 warm-up steps,
    # decay floored at 5%, no clipping; in float32 on every machine (policy.dtype auto would
    # train it in bf16 on some CPUs and give each a different tiny policy).
    cfg = RunConfig(seed=seed, policy=PolicyConfig(dtype="float32"), sft=SFTConfig(max_steps=steps, learning_rate=3e-3, weight_decay=0.01, warmup_steps=20,
                                             min_lr_ratio=0.05, batch_size=32, micro_batch_size=32, max_grad_norm=0.0))
    history = train_sft(model, tokenizer.pad_token_id, load_examples(DATA, tokenizer, cfg.sft, log), cfg, log)
    out = save_sft(model, tokenizer, out, history, overwrite=overwrite, parents=True)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"init-tiny: saved a {n_params / 1e6:.2f}M-parameter policy to {out}")
    return out
