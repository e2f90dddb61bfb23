"""`oaif best-of-n`: the best of n sampled responses per prompt, by the configured annotator.

    oaif best-of-n CONFIG --out best.jsonl [--overwrite] [key=value ...]
        e.g. generate.samples_per_prompt=8 annotate.ranking=knockout

For users who want better outputs rather than a trained policy (Llama 2's rejection
sampling): the policy (policy.model) samples generate.samples_per_prompt responses to every
prompt of `prompts`, the annotator ranks them (annotate.ranking round_robin or knockout, each
comparison in both orders), and each prompt's best response is written as one JSONL row in
TRL's prompt-completion chat format, which `oaif sft` trains on (rejection-sampling
fine-tuning), with the ranking beside it:
    {"prompt_id", "prompt": [messages], "completion": [{"role": "assistant", "content": best}],
     "ranking": [sample indices, best first], "scores": round_robin's or null,
     "responses": [every sampled text], "comparisons": n}
The file is written whole, so a failed run leaves none; it is new, or with --overwrite an
earlier one oaif wrote (oaif/outputs.py), checked before any sampling.
"""

from __future__ import annotations

import time
from pathlib import Path

from oaif import outputs
from oaif.annotate.ranking import rank_groups
from oaif.annotate.backends import build_annotator, check_inputs, with_python_annotator
from oaif.config import ConfigError, RunConfig
from oaif.datasets_io import load_prompts
from oaif.engine import local_engine
from oaif.generate import Generator
from oaif.models import check_model, policy_tokenizer

KIND = "best-of-n output"


def best_of_n(cfg: RunConfig, out: str | Path, *, annotator=None, log=print, overwrite: bool = False) -> Path:
    """Writes `out` (see the module docstring); returns its path. annotator: your judge (a
    function or annotator object) in place of the config's."""
    a = cfg.annotate
    if a.ranking == "consecutive":
        raise ConfigError("annotate.ranking: best-of-n ranks all of a prompt's responses; set "
                          "annotate.ranking=round_robin or knockout")
    prompts = load_prompts(cfg.prompts, "run.prompts", cfg.prompts_column, cfg.prompts_split)
    if annotator is not None:
        cfg = with_python_annotator(cfg, annotator)
    check_model(cfg.policy.model, "policy.model")
    check_inputs(cfg, python=annotator)
    outputs.check(out, KIND, folder=False, overwrite=overwrite)
    g, t0 = cfg.generate, time.perf_counter()
    engine = local_engine(cfg)
    try:
        generator = Generator(engine, policy_tokenizer(cfg.policy), g, cfg.policy.max_prompt_tokens, cfg.seed)
        groups, metrics = generator.sample(prompts, 0, 0)
    finally:
        engine.close()
    judged, rankings = rank_groups(build_annotator(cfg, annotator), groups, a.ranking, "best_worst", 0, 0,
                                   a.missing_eos_penalty, min_label_mass=a.min_label_mass)
    rows = [{"prompt_id": r.prompt_id, "prompt": group[0].messages,
             "completion": [{"role": "assistant", "content": group[r.order[0]].text}],
             "ranking": r.order, "scores": r.scores, "responses": [s.text for s in group], "comparisons": r.comparisons}
            for group, r in zip(groups, rankings)]
    out = outputs.write_jsonl(out, KIND, rows, overwrite=overwrite)
    skipped = metrics["generate/prompts_skipped"]
    log(f"best of {g.samples_per_prompt} for {len(rows)} prompts ({skipped} over policy.max_prompt_tokens skipped), "
        f"{len(judged.judgments)} comparisons by {a.backend} ({a.ranking}) in {time.perf_counter() - t0:.1f} s -> {out}")
    return out
