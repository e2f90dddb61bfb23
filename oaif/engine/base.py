"""The one interface every policy engine offers, wherever the engine runs.

An engine holds the policy's weights as of the last `load_weights` and samples from them on
prompt token ids, returning the exact sampled token ids (the trainer never re-tokenizes).
Three implementations: in this process (engine/vllm.py), in a process of its own that
samples while this one trains (engine/process.py), and a vLLM server (engine/server.py);
engine/__init__.py's `open_policy_engine` picks one from the config.
"""

from __future__ import annotations

from typing import Protocol

import torch

Completion = tuple[list[int], str, str]   # (token ids, text, finish_reason)


class PolicyEngine(Protocol):
    def sample(self, prompt_token_ids: list[list[int]], seeds: list[list[int]], temperature: float, top_p: float,
               max_tokens: int) -> list[list[Completion]]:
        """len(seeds[j]) samples of prompt j, sample k drawn with seed seeds[j][k]."""
        ...

    def submit(self, prompt_token_ids: list[list[int]], seeds: list[list[int]], temperature: float, top_p: float,
               max_tokens: int) -> None:
        """sample()'s request, answered by collect(): an engine in its own process draws the
        samples while the caller goes on (trains); the others draw them now."""
        ...

    def collect(self) -> list[list[Completion]]:
        """The completions of the submitted request (waiting for them)."""
        ...

    def greedy(self, prompt_token_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        ...

    def load_weights(self, policy: torch.nn.Module, version: int, state_dict: dict | None = None) -> None:
        """Sample from `policy`'s current weights from now on (a LoRA policy: merged in, or
        served as an adapter). version: the policy version they are. state_dict: the full
        weights, gathered from ranks that hold shards of the policy (a server only)."""
        ...

    def close(self) -> None:
        """End the engine (and the process or server it started); safe twice."""
        ...


class Submitted:
    """submit / collect for an engine that samples in the caller's thread: the request is
    answered at once and held until collected."""

    _submitted: list[list[Completion]] | None = None

    def submit(self, prompt_token_ids, seeds, temperature, top_p, max_tokens) -> None:
        if self._submitted is not None:
            raise RuntimeError("a submitted sample is still outstanding: call collect() first")
        self._submitted = self.sample(prompt_token_ids, seeds, temperature, top_p, max_tokens)

    def collect(self) -> list[list[Completion]]:
        if self._submitted is None:
            raise RuntimeError("collect() without a submitted sample")
        done, self._submitted = self._submitted, None
        return done
