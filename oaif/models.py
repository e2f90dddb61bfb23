"""Loading the models a run uses: the policy and its reference, local judges, reward models
and their tokenizers, each named in the config by a model folder or a hub id.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from oaif.bundled import data_path
from oaif.config import ConfigError, PolicyConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The CPU's feature flags from the text of Linux's /proc/cpuinfo (its first `flags` line;
    none where there is none, as on ARM, which lists `Features`)."""
    return frozenset(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                           if line.startswith("flags")), []))


def choose_dtype(cuda_bf16: bool | None, flags: frozenset[str]) -> tuple[str, str]:
    """What `dtype: auto` means on a machine: (dtype, why). cuda_bf16: whether the CUDA device
    computes bfloat16 (None: no CUDA device, the CPU decides by its flags).

    bfloat16 only where it is native and was measured faster (docs/benchmarks.md, "float32 or
    bfloat16"): AMX (`amx_bf16`) and AVX512-BF16 (`avx512_bf16`) have bf16 matmul instructions;
    without them (AVX2) torch emulates bf16 and training ran 9-14x slower."""
    if cuda_bf16 is not None:
        return ("bfloat16", "the CUDA device computes bfloat16") if cuda_bf16 else \
            ("float32", "the CUDA device has no bfloat16")
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")):
        if flag in flags:
            return "bfloat16", f"the CPU has {name} ({flag})"
    return "float32", "the CPU has neither AMX nor AVX512-BF16, so bfloat16 would be emulated"


@functools.cache
def auto_dtype() -> tuple[str, str]:
    """This machine's choice for `dtype: auto`, (dtype, why): decided once per process."""
    cuda = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None
    cpuinfo = Path("/proc/cpuinfo")
    return choose_dtype(cuda, cpu_flags(cpuinfo.read_text() if cpuinfo.is_file() else ""))


def resolve_dtype(name: str) -> str:
    """A config's dtype as it runs: `name` itself, or for 'auto' this machine's choice."""
    return auto_dtype()[0] if name == "auto" else name


def dtype_line(name: str) -> str:
    """A run's start-up line on its precision: the dtype policy.dtype `name` runs in, and why."""
    return f"precision: {resolve_dtype(name)} (" + (f"policy.dtype auto: {auto_dtype()[1]})" if name == "auto"
                                                   else "policy.dtype)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_causal_lm(path: str, dtype: str, trainable: bool, device: str = "cpu") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[resolve_dtype(dtype)]).to(resolve_device(device))
    model.train(trainable)  # the frozen reference stays in eval mode (no dropout)
    model.requires_grad_(trainable)
    return model


def load_tokenizer(path: str, chat_template: str = ""):
    """The model's tokenizer; chat_template: a template file (or a bundled one by name) in place
    of the tokenizer's own, for a model that has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        template = data_path(chat_template)
        if not template.is_file():
            raise ConfigError(f"policy.chat_template: {chat_template} not found; give a Jinja template file or "
                              f"'plain' (the bundled one)")
        tokenizer.chat_template = template.read_text()
    return tokenizer


def policy_tokenizer(cfg: PolicyConfig, model: str = ""):
    """The policy's tokenizer (or `model`'s, a baseline of the same family) with policy.chat_template.
    Prompts reach the policy through its chat template: a model without one (a base model) is
    refused here, before anything starts, with the fix."""
    model = model or cfg.model
    tokenizer = load_tokenizer(model, cfg.chat_template)
    if not tokenizer.chat_template:
        raise ConfigError(f"policy.model: {model} has no chat template (a base model?), and prompts reach the "
                          f"policy through one; set policy.chat_template=plain (the bundled 'User: ...' / "
                          f"'Assistant: ...' turns) or a Jinja template file of yours")
    return tokenizer


def check_model(model: str, key: str) -> None:
    """Fail fast, naming the config key, on a model reference that is neither a model folder
    nor plausibly a hub id: from_pretrained would otherwise retry the hub for a minute and end
    in a traceback. A hub id is `name` or `org/name` whose `org` is not a local folder."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: {model} is a folder without config.json, not a Hugging Face model folder")
        return
    missing = (f"{key}: model folder {model!r} not found; give a model folder (oaif init-tiny models/tiny "
               f"or oaif convert-gguf FILE --out DIR make one) or a hub id (org/name)")
    local = model.startswith((".", "/", "~")) or model.count("/") > 1 or (model.count("/") == 1 and path.parent.is_dir())
    if local or path.exists() or not model.strip():
        raise ConfigError(missing)
    # A hub id: fine if cached; otherwise ask the hub once, briefly, so that `models/tiny` before
    # `init-tiny` (which reads as org/name until models/ exists) is named here, not in a traceback.
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"{missing}; HF_HUB_OFFLINE is set and the hub cache does not hold it")
    try:
        HfApi().model_info(model, timeout=10)
    except Exception as e:   # not found, gated, or no network: every one ends the run here
        raise ConfigError(f"{missing}; the hub did not give it either ({type(e).__name__}: {str(e)[:200]})") from e


DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout to 0: nn.Dropout modules, and the float rates that attention modules
    copy from the config when built (Llama's `self.attention_dropout`), which a change to the
    config alone would not reach."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for key in DROPOUT_KEYS:
            if isinstance(getattr(module, key, None), float):
                setattr(module, key, 0.0)
    for key in DROPOUT_KEYS:
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)
