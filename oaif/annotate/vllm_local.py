"""The `vllm` backend: a local judge LLM in its own vLLM engine.

vLLM returns exactly the two label tokens' log-probs (`logprob_token_ids`), so no top-k
cut-off applies; both orders of all pairs go to the engine in one batched call.
"""

from __future__ import annotations

from oaif.annotate.base import JudgeTemplate
from oaif.annotate.local import LocalJudge
from oaif.config import AnnotateConfig
from oaif.constitution import Constitution
from oaif.engine.vllm import build_llm, shutdown_llm


class VLLMScorer:
    def __init__(self, llm):
        self.llm = llm

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[str]:
        from vllm import SamplingParams, TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                 SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    def label_logprobs(self, prompts: list[list[int]], label_ids: list[list[int]]) -> list[tuple[float, float, str]]:
        from vllm import SamplingParams, TokensPrompt

        params = [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids) for ids in label_ids]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        result = []
        for out, ids in zip(outs, label_ids):
            c = out.outputs[0]
            result.append((c.logprobs[0][ids[0]].logprob, c.logprobs[0][ids[1]].logprob, c.text))
        return result


class VLLMJudge(LocalJudge):
    def close(self) -> None:
        """End the judge's engine now (engine/vllm.py's shutdown_llm says why not at collection); safe twice."""
        if self.scorer.llm is not None:
            shutdown_llm(self.scorer.llm)
            self.scorer.llm = None


def judge_llm(cfg: AnnotateConfig, model: str, seed: int, max_model_len: int):
    """A vLLM engine for a judge model (or Constitutional AI's critic), built with the annotate
    section's dtype and memory settings."""
    return build_llm(model, cfg.dtype, seed=seed, kv_cache_gib=cfg.kv_cache_gib, max_model_len=max_model_len,
                     gpu_memory_utilization=cfg.gpu_memory_utilization, enforce_eager=cfg.enforce_eager)


def vllm_judge(cfg: AnnotateConfig, model: str, constitution: Constitution, template: JudgeTemplate,
               seed: int = 0) -> VLLMJudge:
    """A judge in its own engine."""
    from transformers import AutoTokenizer

    llm = judge_llm(cfg, model, seed, cfg.max_prompt_tokens + 1)
    return VLLMJudge(VLLMScorer(llm), AutoTokenizer.from_pretrained(model), cfg, constitution, template, "vllm", model)
