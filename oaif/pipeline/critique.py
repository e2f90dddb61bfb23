"""`oaif critique`: Constitutional AI's supervised stage, critique and revision (Bai et al.
2022, §3), on the engines the loop uses.

    oaif critique CONFIG [key=value ...] --out DIR [--overwrite]

For each prompt (critique.prompts, else `prompts`; the first critique.max_prompts) the policy
answers; then, critique.revisions times, a principle is drawn from the constitution (seeded:
one per prompt and step, as Constitutional AI samples one critique request per step), the
critic critiques the current response against it (critique.critique_template), and the
policy rewrites the response given that critique (critique.revision_template). The critic
(critique.critic) is the policy itself (the paper's setup), another model in its own vLLM
engine or in transformers, or an OpenAI-compatible chat endpoint (annotate.openai). A local
model reads every prompt as a user turn of its chat template, rendered as the loop renders
its prompts (generate.encode_prompt). Text that the user or a model wrote goes into a
template neutralised as a judge prompt's inserted text is (annotate/base.py: the template's
<tags>, chat-format special tokens, lines that start like a role header), so a response
holding `</critique>` or `<|im_end|>` cannot change the structure of the prompt it is quoted in.

DIR is written whole (built beside it, then renamed; an earlier critique output only with
--overwrite, oaif/outputs.py):
  records.jsonl  per prompt: its messages, the original answer and, per step, the principle,
                 the rendered critique prompt, the critique, the rendered revision prompt and
                 the revision; the models and the constitution; `dropped`: why the prompt
                 ended early (a prompt over critique.max_prompt_tokens, a failed request), else null
  sft.jsonl      {"messages": the prompt + the final revision as the assistant's turn}, which
                 `oaif sft` trains on
  pairs.jsonl    {"id", "prompt": chat messages, "chosen": the final revision, "rejected": the
                 original answer}, which `oaif offline` and `oaif train-rm` read; a revision
                 equal to the original gives no pair
  summary.json   counts, mean lengths (characters), seconds
An empty final revision goes to neither sft.jsonl nor pairs.jsonl (counted).
"""

from __future__ import annotations

import json
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from oaif import outputs
from oaif.annotate.base import TAG, neutralise, render_inserted_conversation
from oaif.annotate.openai_api import OpenAIAnnotator
from oaif.annotate.transformers_local import TransformersScorer
from oaif.annotate.vllm_local import judge_llm
from oaif.bundled import data_path
from oaif.config import ConfigError, CritiqueConfig, RunConfig
from oaif.constitution import Constitution, load_constitution
from oaif.datasets_io import load_prompts
from oaif.engine import local_engine
from oaif.engine.vllm import InProcessEngine
from oaif.generate import encode_prompt, sample_seeds
from oaif.models import check_model, load_causal_lm, load_tokenizer
from oaif.records import Message, Prompt, write_jsonl

KIND = "critique output"
PLACEHOLDERS = ("principle", "conversation", "response", "critique")
REQUIRED = {"critique_template": ("principle", "conversation", "response"),
            "revision_template": ("conversation", "response", "critique")}

Reply = tuple[str | None, str | None]                       # (text, None), or (None, why there is none)
Writer = Callable[[list[list[Message]], str], list[Reply]]  # (conversations, stage) -> one reply each


@dataclass(frozen=True)
class Template:
    text: str
    markers: tuple[str, ...]   # the template's tags, neutralised in the text inserted into it

    def render(self, **values: str | list[Message]) -> str:
        """Each value neutralised; a conversation given as messages is neutralised message by
        message, so its role headers stay real and none can be faked."""
        # str.format inserts the values verbatim: braces in a response are safe.
        return self.text.format(**{k: render_inserted_conversation(v, self.markers) if isinstance(v, list)
                                   else neutralise(v, self.markers) for k, v in values.items()})


def load_template(cfg: CritiqueConfig, key: str) -> Template:
    """critique.<key>, checked: the file exists, has its required placeholders and no others."""
    path = data_path(getattr(cfg, key))
    if not path.is_file():
        raise FileNotFoundError(f"critique.{key}: template {path} not found; set critique.{key} to a template file "
                                f"(the default is {getattr(CritiqueConfig(), key)})")
    text = path.read_text().strip()
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as e:   # a lone brace
        raise ValueError(f"{path}: {e} (critique.{key}); write a literal brace as {{{{ or }}}}") from None
    missing = [f"{{{n}}}" for n in REQUIRED[key] if n not in names]
    if missing:
        raise ValueError(f"{path}: the template lacks placeholder(s) {', '.join(missing)} (critique.{key}); "
                         f"it needs {' '.join(f'{{{n}}}' for n in REQUIRED[key])}")
    unknown = sorted(names - set(PLACEHOLDERS))
    if unknown:
        raise ValueError(f"{path}: unknown placeholder(s) {', '.join(f'{{{n}}}' for n in unknown)} (critique.{key}); "
                         f"known: {' '.join(f'{{{n}}}' for n in PLACEHOLDERS)}")
    return Template(text, tuple(dict.fromkeys(TAG.findall(text))))


def load_principles(cfg: RunConfig) -> Constitution:
    key = "critique.constitution" if cfg.critique.constitution else "annotate.constitution"
    path = cfg.critique.constitution or cfg.annotate.constitution
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}: constitution file {path} not found")
    return load_constitution(path)   # refuses a file without principles, naming it


def draw_principles(constitution: Constitution, seed: int, prompts: int, revisions: int) -> list[list[str]]:
    """principles[j][step] of prompt j: a hash of the seed, the prompt's place and the step
    (generate.sample_seeds), so a rerun draws the same ones and each step draws afresh."""
    p = constitution.principles
    return [[p[s % len(p)] for s in row] for row in sample_seeds(seed, "critique principles", prompts, revisions)]


def local_writer(tokenizer, generate, limit: int) -> Writer:
    """A local model's replies: each conversation through its chat template as the loop
    renders prompts, then generate(token ids, stage) -> texts. A prompt over `limit` tokens
    gets no reply (never truncated)."""
    def write(conversations: list[list[Message]], stage: str) -> list[Reply]:
        ids = [encode_prompt(tokenizer, c) for c in conversations]
        fits = [i for i, x in enumerate(ids) if len(x) <= limit]
        replies: list[Reply] = [(None, f"{len(x)} prompt tokens > critique.max_prompt_tokens={limit}") for x in ids]
        for i, text in zip(fits, generate([ids[i] for i in fits], stage) if fits else []):
            replies[i] = (text, None)
        return replies
    return write


def engine_generate(engine, cfg: CritiqueConfig, seed: int):
    """generate() for local_writer from a vLLM engine: one sample per prompt (greedy at
    temperature 0), each seeded from the run's seed, the stage and its place."""
    def generate(ids: list[list[int]], stage: str) -> list[str]:
        outs = engine.sample(ids, sample_seeds(seed, stage, len(ids), 1), cfg.temperature, 1.0, cfg.max_new_tokens)
        return [text for [(_, text, _)] in outs]
    return generate


def chat_tokenizer(model: str, key: str):
    tokenizer = load_tokenizer(model)
    if not tokenizer.chat_template:
        raise ConfigError(f"{key}: {model} has no chat template; critique and revision prompts reach it as a user "
                          f"turn, so give a chat (instruct) model")
    return tokenizer


def policy_writer(cfg: RunConfig, engines: list) -> Writer:
    """The policy in a vLLM engine, built as the loop builds it; the engine is appended to
    `engines` (the caller ends it)."""
    c = cfg.critique
    tokenizer = chat_tokenizer(cfg.policy.model, "policy.model")
    engines.append(local_engine(cfg, max_model_len=c.max_prompt_tokens + c.max_new_tokens))
    return local_writer(tokenizer, engine_generate(engines[-1], c, cfg.seed), c.max_prompt_tokens)


def critic_writer(cfg: RunConfig, policy: Writer, engines: list) -> Writer:
    """critique.critic: the policy's writer, or the critic model's (a vLLM engine of its own
    is appended to `engines`, which the caller ends)."""
    c, a = cfg.critique, cfg.annotate
    if c.critic == "policy":
        return policy
    if c.critic == "openai":
        api = OpenAIAnnotator(a, c.critic_model, constitution=None, template=None)   # complete() reads neither
        # A critic's conversation is one user turn, the critique prompt: sent as the API's user message.
        return lambda conversations, stage: api.complete([m[-1]["content"] for m in conversations],
                                                         c.max_new_tokens, c.temperature)
    tokenizer = chat_tokenizer(c.critic_model, "critique.critic_model")
    if c.critic == "vllm":
        engines.append(InProcessEngine(judge_llm(a, c.critic_model, cfg.seed, c.max_prompt_tokens + c.max_new_tokens)))
        return local_writer(tokenizer, engine_generate(engines[-1], c, cfg.seed), c.max_prompt_tokens)

    scorer = TransformersScorer(load_causal_lm(c.critic_model, a.dtype, trainable=False, device=cfg.policy.device),
                                tokenizer, a.batch_size)
    return local_writer(tokenizer, lambda ids, stage: scorer.greedy(ids, c.max_new_tokens), c.max_prompt_tokens)


def _before(record: dict) -> str:
    """The response the record's last step works on: the previous revision, or the original."""
    return record["steps"][-2]["revision"] if len(record["steps"]) > 1 else record["original"]


def critique_and_revise(prompts: list[Prompt], principles: list[list[str]], critique: Template, revision: Template,
                        policy: Writer, critic: Writer, log=print) -> list[dict]:
    """One record per prompt (module docstring); principles[j][step] for prompt j."""
    records = [{"id": p.id, "messages": p.messages, "original": None, "steps": [], "dropped": None} for p in prompts]

    def ask(writer: Writer, todo: list[tuple[dict, dict, str | list[Message]]], key: str, stage: str) -> None:
        """todo: (record, where its reply goes, the prompt: a conversation, or a user turn's
        text); a prompt left without a reply ends its record's critique."""
        t0 = time.perf_counter()
        conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else p for _, _, p in todo]
        for (record, into, _), (text, why) in zip(todo, writer(conversations, stage)):
            into[key] = text
            if text is None:
                record["dropped"] = f"{stage}: {why}"
        log(f"critique: {stage}: {len(todo)} prompts ({time.perf_counter() - t0:.1f}s)")

    ask(policy, [(r, r, r["messages"]) for r in records], "original", "answer")
    for step in range(len(principles[0])):
        live = [(j, r) for j, r in enumerate(records) if r["dropped"] is None]
        for j, r in live:
            response = r["steps"][-1]["revision"] if r["steps"] else r["original"]
            prompt = critique.render(principle=principles[j][step], conversation=r["messages"], response=response)
            r["steps"].append({"principle": principles[j][step], "critique_prompt": prompt, "critique": None,
                               "revision_prompt": None, "revision": None})
        ask(critic, [(r, r["steps"][-1], r["steps"][-1]["critique_prompt"]) for _, r in live], "critique",
            f"critique {step + 1}")
        live = [r for _, r in live if r["dropped"] is None]
        for r in live:
            s = r["steps"][-1]
            s["revision_prompt"] = revision.render(principle=s["principle"], conversation=r["messages"],
                                                   response=_before(r), critique=s["critique"])
        ask(policy, [(r, r["steps"][-1], r["steps"][-1]["revision_prompt"]) for r in live], "revision",
            f"revision {step + 1}")
    return records


def training_rows(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(sft.jsonl rows, pairs.jsonl rows) of the records that finished with a non-empty revision."""
    done = [(r, r["steps"][-1]["revision"]) for r in records if r["dropped"] is None]
    done = [(r, final) for r, final in done if final.strip()]
    sft = [{"messages": r["messages"] + [{"role": "assistant", "content": final}]} for r, final in done]
    pairs = [{"id": r["id"], "prompt": r["messages"], "chosen": final, "rejected": r["original"]}
             for r, final in done if final.strip() != r["original"].strip()]
    return sft, pairs


def run_critique(cfg: RunConfig, out: str | Path, overwrite: bool = False, log=print) -> dict:
    """The whole `oaif critique` command (module docstring); returns the summary."""
    t0 = time.perf_counter()
    c, out = cfg.critique, Path(out)
    # Every input is checked before a model loads.
    source = c.prompts or cfg.prompts
    prompts = load_prompts(source, "critique.prompts" if c.prompts else "prompts", cfg.prompts_column,
                           cfg.prompts_split)
    prompts = prompts[:c.max_prompts] if c.max_prompts else prompts
    constitution = load_principles(cfg)
    critique, revision = (load_template(c, key) for key in REQUIRED)
    outputs.check(out, KIND, folder=True, overwrite=overwrite)
    check_model(cfg.policy.model, "policy.model")
    if c.critic in ("vllm", "transformers"):
        check_model(c.critic_model, "critique.critic_model")
    critic_model = cfg.policy.model if c.critic == "policy" else c.critic_model
    log(f"critique: {len(prompts)} prompts of {source}, {c.revisions} revision(s) each by {cfg.policy.model}, "
        f"critic {c.critic} ({critic_model}), principles of {constitution.path}")
    engines: list = []
    try:
        policy = policy_writer(cfg, engines)
        critic = critic_writer(cfg, policy, engines)
        startup = time.perf_counter() - t0
        principles = draw_principles(constitution, cfg.seed, len(prompts), c.revisions)
        records = critique_and_revise(prompts, principles, critique, revision, policy, critic, log)
    finally:
        for engine in engines:
            engine.close()
    provenance = {"policy": cfg.policy.model, "critic": c.critic, "critic_model": critic_model,
                  "constitution": constitution.name, "constitution_hash": constitution.hash}
    records = [{**r, **provenance} for r in records]
    sft, pairs = training_rows(records)
    done = [r for r in records if r["dropped"] is None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731 (None, not 0, when there is nothing)
    summary = {
        "prompts": len(records), "completed": len(done), "dropped": len(records) - len(done),
        "sft_rows": len(sft), "pairs": len(pairs),
        "empty_revisions": sum(not r["steps"][-1]["revision"].strip() for r in done),
        "unchanged_revisions": len(sft) - len(pairs), "revisions": c.revisions, **provenance,
        "mean_chars": {"original": mean([len(r["original"]) for r in done]),
                       "critique": mean([len(s["critique"]) for r in done for s in r["steps"]]),
                       "revision": mean([len(r["steps"][-1]["revision"]) for r in done])},
        "seconds": {"startup": startup, "total": time.perf_counter() - t0},
    }

    def fill(staging: Path) -> None:
        write_jsonl(staging / "records.jsonl", records)
        write_jsonl(staging / "sft.jsonl", sft)
        write_jsonl(staging / "pairs.jsonl", pairs)
        (staging / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")

    outputs.write_folder(out, KIND, fill, overwrite=overwrite)
    if summary["dropped"]:
        log(f"critique: warning: {summary['dropped']} prompt(s) ended early, e.g. "
            f"{next(r['dropped'] for r in records if r['dropped'])} (records.jsonl says why for each)")
    log(f"critique: {len(done)} of {len(records)} prompts revised; {len(sft)} rows in sft.jsonl, {len(pairs)} pairs "
        f"in pairs.jsonl -> {out} ({summary['seconds']['total']:.0f}s)")
    return summary
