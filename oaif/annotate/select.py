"""Builds the annotator named in config, from one explicit mapping of backends."""

from __future__ import annotations

import dataclasses
from typing import Callable

from oaif.annotate.base import Annotator, JudgeTemplate, load_template
from oaif.config import AnnotateConfig, RunConfig
from oaif.constitution import Constitution, load_constitution


def _rules(cfg: RunConfig, a: AnnotateConfig, model: str, constitution: Constitution,
           template: JudgeTemplate) -> Annotator:
    from oaif.annotate.rules import RulesAnnotator

    return RulesAnnotator(constitution)


def _vllm(cfg: RunConfig, a: AnnotateConfig, model: str, constitution: Constitution,
          template: JudgeTemplate) -> Annotator:
    from oaif.annotate.vllm_local import VLLMAnnotator

    return VLLMAnnotator(a, model, constitution, template, seed=cfg.seed + 1)


def _transformers(cfg: RunConfig, a: AnnotateConfig, model: str, constitution: Constitution,
                  template: JudgeTemplate) -> Annotator:
    from oaif.annotate.transformers_local import TransformersAnnotator

    return TransformersAnnotator(a, model, constitution, template, device=cfg.policy.device)


def _openai(cfg: RunConfig, a: AnnotateConfig, model: str, constitution: Constitution,
            template: JudgeTemplate) -> Annotator:
    from oaif.annotate.openai_api import OpenAIAnnotator

    return OpenAIAnnotator(a, model, constitution, template)


BACKENDS: dict[str, Callable[..., Annotator]] = {
    "rules": _rules, "vllm": _vllm, "transformers": _transformers, "openai": _openai,
}


def load_inputs(a: AnnotateConfig, constitution_path: str) -> tuple[Constitution, JudgeTemplate]:
    """Constitution and template, validated together (cheap: call before starting engines)."""
    constitution = load_constitution(constitution_path, sample_principles=a.principles == "sample")
    return constitution, load_template(a.template, constitution)


def _single(cfg: RunConfig, backend: str, constitution_path: str, model: str) -> Annotator:
    a = cfg.annotate
    constitution, template = load_inputs(a, constitution_path)
    annotator = BACKENDS[backend](cfg, a, model or a.model or cfg.policy.model, constitution, template)
    if a.cache and backend != "rules":  # rules cost nothing to re-run
        from oaif.annotate.cache import CachedAnnotator, model_fingerprint

        settings = {k: v for k, v in dataclasses.asdict(a).items()
                    if k in ("labels", "principles", "chain_of_thought", "rationale_tokens", "chat_template",
                              "dtype", "max_prompt_tokens")}
        settings["openai"] = {k: getattr(a.openai, k)
                              for k in ("base_url", "endpoint", "mode", "top_logprobs", "temperature")}
        if backend in ("vllm", "transformers"):   # a local folder is named by its content, not its path
            settings["model_content"] = model_fingerprint(annotator.identity.model)
        annotator = CachedAnnotator(annotator, a.cache, settings)
    return annotator


def build_annotator(cfg: RunConfig) -> Annotator:
    a = cfg.annotate
    if a.backend != "mix":
        return _single(cfg, a.backend, a.constitution, "")
    from oaif.annotate.mix import MixAnnotator

    return MixAnnotator([(_single(cfg, m.backend, m.constitution or a.constitution, m.model), m.weight)
                         for m in a.mix])


def check_inputs(cfg: RunConfig, where: str = "annotate") -> None:
    """Fail on a bad constitution or template, a missing judge model, or labels the judge's
    tokenizer cannot read as one token each, before any engine starts or file is written.
    where: the config section `cfg.annotate` came from (named in the errors)."""
    from oaif.generate import check_model

    a = cfg.annotate
    members = [(f"{where}.mix[{i}]", m.backend, m.constitution or a.constitution, m.model)
               for i, m in enumerate(a.mix)] if a.backend == "mix" else [(where, a.backend, a.constitution, "")]
    for key, backend, path, model in members:
        constitution, template = load_inputs(a, path)
        if backend in ("vllm", "transformers"):
            from oaif.annotate.local import check_labels

            if model or a.model:   # else the policy's model, checked as policy.model
                check_model(model or a.model, f"{key}.model" if model else f"{where}.model")
            check_labels(a, model or a.model or cfg.policy.model, constitution, template)
