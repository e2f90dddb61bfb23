"""Multi-turn conversations (generate.turns: N > 1): each prompt's conversation is grown
before the round's pair is sampled, so that the pair answers turn N with the earlier turns
as shared context.

Each of the N-1 steps: the policy answers the conversation (one sample, seeded like the
round's samples, so a rerun or a resumed run grows the same conversations), then the user
simulator writes the user's next message. The simulator (generate.user_simulator: policy) is
the policy itself, asked in generate.user_simulator_template to write that message from the
conversation so far. A system message stays first; the simulator does not see it, as a user
never sees the assistant's system prompt.

A conversation whose next input (the policy's or the simulator's) is over
policy.max_prompt_tokens is dropped from the round and counted in
generate/conversations_skipped; the grown conversations then pass through the round's
generate, which skips and counts (generate/prompts_skipped) any over the limit as usual.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from oaif.annotate.base import render_conversation
from oaif.bundled import data_path
from oaif.generate import Generator, encode_prompt, sample_seeds
from oaif.records import Message, Prompt

PLACEHOLDER = "{conversation}"


def load_simulator_template(path: str | Path) -> str:
    path = data_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"user simulator template {path} not found (generate.user_simulator_template)")
    text = path.read_text()
    if PLACEHOLDER not in text:
        raise ValueError(f"{path}: the user simulator template lacks the {PLACEHOLDER} placeholder")
    return text


def simulator_messages(template: str, messages: list[Message]) -> list[Message]:
    """The simulator's input: the template, as a user turn, with the conversation's user and
    assistant turns in its placeholder (replace, not format: braces in the text stay as they are)."""
    shown = [m for m in messages if m["role"] != "system"]
    return [{"role": "user", "content": template.replace(PLACEHOLDER, render_conversation(shown))}]


def extend_conversations(generator: Generator, prompts: list[Prompt], round: int, metrics: dict) -> list[Prompt]:
    """The round's prompts with generate.turns - 1 more (assistant, user) turns each; those that
    outgrew policy.max_prompt_tokens are left out. Adds generate/conversations_skipped to
    `metrics`, and the time taken to generate/seconds."""
    cfg = generator.cfg
    if cfg.turns == 1:
        return prompts
    t0 = time.perf_counter()
    template = load_simulator_template(cfg.user_simulator_template)
    grown = prompts
    for turn in range(1, cfg.turns):
        grown = _add_turn(generator, grown, lambda m: m, "assistant", f"round {round} turn {turn} assistant")
        grown = _add_turn(generator, grown, lambda m: simulator_messages(template, m), "user",
                          f"round {round} turn {turn} user")
    metrics["generate/conversations_skipped"] = len(prompts) - len(grown)
    metrics["generate/seconds"] = metrics.get("generate/seconds", 0.0) + time.perf_counter() - t0
    return grown


def _add_turn(generator: Generator, prompts: list[Prompt], shown: Callable[[list[Message]], list[Message]],
              role: str, stage: str) -> list[Prompt]:
    """Each conversation with one more `role` turn, the policy's one sample from shown(its
    messages); a conversation whose input is over max_prompt_tokens is left out."""
    encoded = [(p, encode_prompt(generator.tokenizer, shown(p.messages))) for p in prompts]
    kept = [(p, ids) for p, ids in encoded if len(ids) <= generator.max_prompt_tokens]
    if not kept:
        return []
    cfg = generator.cfg
    outputs = generator.engine.sample([ids for _, ids in kept], sample_seeds(generator.seed, stage, len(kept), 1),
                                      cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    return [dataclasses.replace(p, messages=[*p.messages, {"role": role, "content": completions[0][1].strip()}])
            for (p, _), completions in zip(kept, outputs)]
