"""Sampling from the current policy with an in-process vLLM engine.

The engine is seeded once (engines.build_llm); a per-request seed would make every
prompt's samples identical.
"""

from __future__ import annotations

import time

from oaif.config import GenerateConfig
from oaif.records import Prompt, Sample


class Generator:
    def __init__(self, llm, tokenizer, cfg: GenerateConfig, max_prompt_tokens: int):
        from vllm import SamplingParams

        self.llm, self.tokenizer, self.cfg = llm, tokenizer, cfg
        self.max_prompt_tokens = max_prompt_tokens
        self.lora_request = None  # set by the sync when vLLM serves the policy's LoRA adapter
        self.params = SamplingParams(n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                                     max_tokens=cfg.max_new_tokens)

    def encode(self, prompt: Prompt) -> list[int]:
        text = self.tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sample(self, prompts: list[Prompt], round: int, policy_version: int) -> tuple[list[list[Sample]], dict]:
        """samples_per_prompt samples per prompt; prompts over max_prompt_tokens are skipped."""
        from vllm import TokensPrompt

        encoded = [(p, self.encode(p)) for p in prompts]
        kept = [(p, ids) for p, ids in encoded if len(ids) <= self.max_prompt_tokens]
        t0 = time.perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for _, ids in kept], self.params,
                                    use_tqdm=False, lora_request=self.lora_request)
        seconds = time.perf_counter() - t0
        groups = []
        for (prompt, ids), out in zip(kept, outputs):
            groups.append([
                Sample(round=round, policy_version=policy_version, prompt_id=prompt.id, messages=prompt.messages,
                       index=k, text=c.text, prompt_token_ids=ids, token_ids=list(c.token_ids),
                       finish_reason=c.finish_reason)
                for k, c in enumerate(out.outputs)])
        lengths = [len(s.token_ids) for g in groups for s in g]
        metrics = {
            "generate/mean_length": sum(lengths) / len(lengths) if lengths else None,
            "generate/tokens_per_s": sum(lengths) / seconds if seconds > 0 else None,
            "generate/truncated_rate": (sum(s.finish_reason == "length" for g in groups for s in g) / len(lengths)
                                        if lengths else None),
            "generate/prompts_skipped": len(encoded) - len(kept),
        }
        return groups, metrics

    def greedy(self, token_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (for checks and evaluation)."""
        from vllm import SamplingParams, TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in token_ids],
                                 SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=False,
                                 lora_request=self.lora_request)
        return [list(o.outputs[0].token_ids) for o in outs]
