"""Picks the annotator backend named in config from one explicit mapping."""

from __future__ import annotations

from typing import Callable

from oaif.annotate.base import Annotator, JudgeTemplate
from oaif.config import RunConfig
from oaif.constitution import Constitution


def _rules(cfg: RunConfig, constitution: Constitution, template: JudgeTemplate) -> Annotator:
    from oaif.annotate.rules import RulesAnnotator

    return RulesAnnotator(constitution)


def _vllm(cfg: RunConfig, constitution: Constitution, template: JudgeTemplate) -> Annotator:
    from transformers import AutoTokenizer

    from oaif.annotate.vllm_local import VLLMAnnotator
    from oaif.engines import build_llm

    a = cfg.annotate
    model = a.model or cfg.policy.model  # default judge: the policy's starting model
    llm = build_llm(model, a.dtype, seed=cfg.seed + 1, kv_cache_gib=a.kv_cache_gib,
                    max_model_len=a.max_prompt_tokens + 1, gpu_memory_utilization=a.gpu_memory_utilization)
    return VLLMAnnotator(llm, AutoTokenizer.from_pretrained(model), a, constitution, template, model)


BACKENDS: dict[str, Callable[[RunConfig, Constitution, JudgeTemplate], Annotator]] = {
    "rules": _rules,
    "vllm": _vllm,
}


def build_annotator(cfg: RunConfig, constitution: Constitution, template: JudgeTemplate) -> Annotator:
    return BACKENDS[cfg.annotate.backend](cfg, constitution, template)
