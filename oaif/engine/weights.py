"""Pushes the trained policy's weights into the running vLLM engine, in place.

The only module that reaches into vLLM's workers. Weights travel as tensors through
`collective_rpc("reload_weights")` (no engine restart, no disk write); the prefix cache is
reset afterwards because its KV blocks were computed with the old weights.

LoRA policies sync one of two ways (`train.lora.sync`):
  merge      push W + BA, computed out of place in float32 and rounded once to the base's
             dtype; the base weights are never touched, so nothing drifts in bf16 over
             rounds (default: the engine then generates at full speed, see README benchmarks);
  vllm_lora  save the adapter and hand vLLM a new LoRARequest (the engine must be built
             with enable_lora).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from oaif.faults import crash_point

# On every reload vLLM warns that the rotary embedding "failed to load": its cos/sin cache
# is a computed buffer, never in a checkpoint, and vLLM restores it. Not a real failure.
logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


@torch.no_grad()
def hf_named_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's weights under the names of the plain Hugging Face checkpoint that vLLM
    loaded. For a peft model: each adapted weight as W + ΔW (the active adapters' deltas),
    summed in float32 into new tensors and rounded once; the wrapper prefix and the lora_*
    tensors are dropped."""
    if not is_peft(model):
        return [(name, t.detach()) for name, t in model.state_dict().items()]
    base = model.get_base_model()
    merged = {}
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            w = module.base_layer.weight
            adapters = [a for a in module.active_adapters
                        if a in module.lora_A or a in getattr(module, "lora_embedding_A", {})]
            delta = sum(module.get_delta_weight(a).float() for a in adapters)
            merged[f"{name}.base_layer.weight"] = (w.float() + delta).to(w.dtype)
    return [(name.replace(".base_layer.", "."), merged.get(name, t).detach())
            for name, t in base.state_dict().items() if "lora_" not in name]


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model to save for a server to reload: a peft policy merged into a copy of its
    base (the trained adapter stays unmerged); a plain policy as it is."""
    if not is_peft(model):
        return model
    import copy

    return copy.deepcopy(model).merge_and_unload()


def push_weights(llm, model: torch.nn.Module) -> float:
    """Load `model`'s current weights (LoRA merged in, out of place) into `llm`; returns seconds."""
    t0 = time.perf_counter()
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": hf_named_weights(model)})
    crash_point("sync_push")
    llm.reset_prefix_cache()
    return time.perf_counter() - t0


def push_lora_adapter(model: torch.nn.Module, root: Path, version: int):
    """Save the adapter for `version` and return the LoRARequest that makes vLLM use it.
    Each version gets a new id: vLLM caches adapters by id."""
    from vllm.lora.request import LoRARequest

    path = root / f"v{version:06d}"
    model.save_pretrained(path)
    crash_point("sync_push")
    return LoRARequest(f"policy-v{version}", version + 1, str(path))
