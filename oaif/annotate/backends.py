"""Builds the annotator named in config, from one explicit mapping of backends."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Callable

from oaif.annotate.base import PROMPT_FORMAT, Annotator, JudgeTemplate, leaf_annotators, load_template
from oaif.annotate.cache import CachedAnnotator
from oaif.annotate.local import check_labels
from oaif.annotate.mix import MixAnnotator
from oaif.annotate.openai_api import OpenAIAnnotator, check_endpoint
from oaif.annotate.python_fn import FunctionAnnotator, load_target, name_of
from oaif.annotate.reward_model import RewardModelAnnotator, check_reward_model
from oaif.annotate.rules import RulesAnnotator
from oaif.annotate.transformers_local import transformers_judge
from oaif.annotate.vllm_local import vllm_judge
from oaif.config import AnnotateConfig, ConfigError, RunConfig
from oaif.constitution import Constitution, load_constitution
from oaif.fingerprint import model_fingerprint
from oaif.models import check_model, resolve_dtype


def _rules(cfg: RunConfig, a: AnnotateConfig, model: str, constitution: Constitution,
           template: JudgeTemplate) -> Annotator:
    return RulesAnnotator(constitution)


def _vllm(cfg: RunConfig, a: AnnotateConfig, model: str, constitution: Constitution,
          template: JudgeTemplate) -> Annotator:
    return vllm_judge(a, model, constitution, template, seed=cfg.seed + 1)


def _transformers(cfg: RunConfig, a: AnnotateConfig, model: str, constitution: Constitution,
                  template: JudgeTemplate) -> Annotator:
    return transformers_judge(a, model, constitution, template, device=cfg.policy.device)


def _openai(cfg: RunConfig, a: AnnotateConfig, model: str, constitution: Constitution,
            template: JudgeTemplate) -> Annotator:
    return OpenAIAnnotator(a, model, constitution, template)


def _python(cfg: RunConfig, a: AnnotateConfig, model: str, constitution: Constitution,
            template: JudgeTemplate, target=None) -> Annotator:
    # An object with the annotator Protocol is used as it is; a function is wrapped.
    return target if callable(getattr(target, "judge", None)) else FunctionAnnotator(target, constitution)


def _reward_model(cfg: RunConfig, a: AnnotateConfig, model: str, constitution: Constitution,
                  template: JudgeTemplate) -> Annotator:
    # The constitution and template are not read: the model learned its preference from pairs.
    return RewardModelAnnotator(model, a.dtype, cfg.policy.device, a.batch_size, a.max_prompt_tokens)


BACKENDS: dict[str, Callable[..., Annotator]] = {
    "rules": _rules, "vllm": _vllm, "transformers": _transformers, "openai": _openai, "python": _python,
    "reward_model": _reward_model,
}


def load_inputs(a: AnnotateConfig, constitution_path: str) -> tuple[Constitution, JudgeTemplate]:
    """Constitution and template, validated together (cheap: call before starting engines)."""
    constitution = load_constitution(constitution_path, sample_principles=a.principles == "sample")
    return constitution, load_template(a.template, constitution)


def _single(cfg: RunConfig, backend: str, constitution_path: str, model: str, target=None) -> Annotator:
    """target: backend 'python', the function or annotator object."""
    a = cfg.annotate
    constitution, template = load_inputs(a, constitution_path)
    extra = {"target": target} if backend == "python" else {}
    annotator = BACKENDS[backend](cfg, a, model or a.model or cfg.policy.model, constitution, template, **extra)
    # rules cost nothing to re-run; a user function is cached only when asked (python_cache).
    if a.cache and backend != "rules" and (backend != "python" or a.python_cache):
        settings = {k: v for k, v in dataclasses.asdict(a).items()
                    if k in ("labels", "principles", "chain_of_thought", "rationale_tokens", "chat_template",
                              "dtype", "max_prompt_tokens")}
        settings["dtype"] = resolve_dtype(a.dtype)   # the precision judged in: 'auto' differs by machine
        settings["prompt_format"] = PROMPT_FORMAT
        settings["openai"] = {k: getattr(a.openai, k)
                              for k in ("base_url", "endpoint", "mode", "top_logprobs", "temperature")}
        if backend in ("vllm", "transformers", "reward_model"):   # a local folder is named by its content
            settings["model_content"] = model_fingerprint(annotator.identity.model)
        annotator = CachedAnnotator(annotator, a.cache, settings)
    return annotator


def build_annotator(cfg: RunConfig, python=None) -> Annotator:
    """python: the judge function or annotator object of backend 'python' when the caller has
    it in hand (oaif.run(annotator=...)); else annotate.python (and each python mix member's)
    is imported."""
    a = cfg.annotate
    if a.backend != "mix":
        target = (python or load_target(a.python, "annotate.python")) if a.backend == "python" else None
        return _single(cfg, a.backend, a.constitution, "", target)

    return MixAnnotator([(_single(cfg, m.backend, m.constitution or a.constitution, m.model,
                                  load_target(m.python, f"annotate.mix[{i}].python") if m.backend == "python" else None),
                          m.weight) for i, m in enumerate(a.mix)])


def reload_constitutions(annotator: Annotator, a: AnnotateConfig, refused: dict[Path, set[str]]) -> list[str]:
    """annotate.reload_constitution: every judge whose constitution file changed since it was
    loaded judges with the new version from now on. A version that does not load (or that
    its backend refuses, e.g. rules without rules) is refused and the judge keeps the one it
    has; `refused` (path -> hashes, kept by the caller) makes each refusal said once.
    Returns what changed, for the log."""
    said = []
    for judge in leaf_annotators(annotator):
        old = getattr(judge, "constitution", None)
        if old is None or not hasattr(judge, "use_constitution"):
            continue   # a user annotator object without use_constitution keeps its own
        path = Path(old.path)
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        except OSError as e:
            digest = f"unreadable: {e}"
        if digest == old.hash or digest in refused.get(path, set()):
            continue
        try:
            constitution, template = load_inputs(a, str(path))
            judge.use_constitution(constitution, template)
            said.append(f"constitution {path} changed ({old.hash} -> {constitution.hash}): judging with it from now on")
        except (ValueError, OSError) as e:   # ConstitutionError and the template's errors are ValueErrors
            refused.setdefault(path, set()).add(digest)
            said.append(f"warning: the edited constitution {path} is not used ({e}); still judging with {old.hash}")
    return said


def with_python_annotator(cfg: RunConfig, annotator) -> RunConfig:
    """cfg judged by `annotator` (backend python), named in the saved config by its
    'module:qualname' so that a resume can import it (or be given it again)."""
    if cfg.annotate.backend == "mix":
        raise ConfigError("annotator=: the config's annotate.backend is 'mix'; name your function in the mix instead "
                          "(annotate.mix[i] = {backend: python, python: 'module:function', weight: ...})")
    if not callable(annotator) and not callable(getattr(annotator, "judge", None)):
        raise ConfigError(f"annotator=: {annotator!r} is neither a function nor an annotator (judge(requests))")
    return dataclasses.replace(cfg, annotate=dataclasses.replace(cfg.annotate, backend="python",
                                                                 python=name_of(annotator)))


def check_inputs(cfg: RunConfig, where: str = "annotate", python=None) -> None:
    """Fail on a bad constitution or template, a missing judge model or function, or labels
    the judge's tokenizer cannot read as one token each, before any engine starts or file is
    written. where: the config section `cfg.annotate` came from (named in the errors);
    python: as for build_annotator (then annotate.python is not imported)."""
    a = cfg.annotate
    members = [(f"{where}.mix[{i}]", m.backend, m.constitution or a.constitution, m.model, m.python)
               for i, m in enumerate(a.mix)] if a.backend == "mix" else [(where, a.backend, a.constitution, "", a.python)]
    for key, backend, path, model, spec in members:
        constitution, template = load_inputs(a, path)
        if backend == "python" and not (python and key == where):
            load_target(spec, f"{key}.python")
        if backend == "openai":   # a config built in code skipped load_config's check: before anything is written

            check_endpoint(a.openai, where)
        if backend in ("vllm", "transformers"):
            if model or a.model:   # else the policy's model, checked as policy.model
                check_model(model or a.model, f"{key}.model" if model else f"{where}.model")
            check_labels(a, model or a.model or cfg.policy.model, constitution, template)
        if backend == "reward_model":   # annotate.model is required for it (config validation)

            check_reward_model(model or a.model, f"{key}.model" if model else f"{where}.model")
