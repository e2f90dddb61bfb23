"""Pushes the trained policy's weights into the running vLLM engine, in place.

The only module that reaches into vLLM's workers. Weights travel as tensors through
`collective_rpc("reload_weights")` (no engine restart, no disk write); the prefix cache is
reset afterwards because its KV blocks were computed with the old weights.
"""

from __future__ import annotations

import logging
import time

import torch

# On every reload vLLM warns that the rotary embedding "failed to load": its cos/sin cache
# is a computed buffer, never in a checkpoint, and vLLM restores it. Not a real failure.
logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)


def push_weights(llm, model: torch.nn.Module) -> float:
    """Load `model`'s current weights into `llm`; returns the seconds it took."""
    t0 = time.perf_counter()
    weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    llm.reset_prefix_cache()
    return time.perf_counter() - t0
