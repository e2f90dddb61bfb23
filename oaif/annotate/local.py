"""What the local LLM backends (vllm, transformers) share: render the judge prompt, check its
length, optionally get a rationale first, then read the two label tokens' log-probs.

The probability that response 1 is better is the softmax over the two label log-probs at
the answer position (RLAIF §2.1; Constitutional AI §4.1). A backend only supplies a
`LabelScorer`: greedy text for rationales, and the label log-probs for a batch of prompts.

An instruct judge is asked the way it was trained to be asked: with `annotate.chat_template`
(default `auto`: when its tokenizer has one) the judge prompt is the user turn of its chat
template and the label is read at the start of its reply, as the `openai` chat endpoint
does. Every string that the judge's tokenizer reads as a special token is neutralised in
the inserted text (JudgeTemplate.specials), so the prompt's token ids hold special ids only
where the chat template (or the tokenizer's BOS) put them. The label mass (the share of
next-token probability on the two labels) is recorded with every answer: a judge that puts
little mass there is not answering the question.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

from oaif.annotate.base import (Answer, Identity, JudgeRequest, JudgeTemplate, rationale_prompt, render_judge_prompt,
                                two_label_probability)
from oaif.config import AnnotateConfig
from oaif.constitution import Constitution
from oaif.models import load_tokenizer


class LabelScorer(Protocol):
    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[str]:
        ...

    def label_logprobs(self, prompts: list[list[int]], label_ids: list[list[int]]) -> list[tuple[float, float, str]]:
        """Per prompt: (log p(label 1), log p(label 2), the greedy next token's text)."""
        ...


def special_tokens(tokenizer) -> tuple[str, ...]:
    """The strings this tokenizer turns into special ids: its named special tokens and every
    added token marked special (chat markers such as `<|im_end|>` are often only the latter).
    Whitespace-only ones cannot be shown neutralised and are left out."""
    found = set(tokenizer.all_special_tokens)
    found |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return tuple(sorted(t for t in found if t.strip()))


def label_token_id(tokenize, prefix_ids: list[int], prompt: str, label: str) -> int:
    """The single token that `label` adds right after `prompt` (tokenizers merge across
    boundaries, so the label is tokenized in place, not alone)."""
    ids = tokenize(prompt + label)
    if ids[:len(prefix_ids)] != prefix_ids or len(ids) != len(prefix_ids) + 1:
        raise ValueError(f"annotate.labels: {label!r} is not one token after the judge prompt for this "
                         f"tokenizer; pick labels that are (e.g. '1'/'2' or 'A'/'B')")
    return ids[-1]


def check_labels(cfg: AnnotateConfig, model: str, constitution: Constitution, template: JudgeTemplate) -> None:
    """Each label is one token right after a judge prompt for this model's tokenizer (a
    ValueError naming annotate.labels if not): checked before the run, not at its first judgment."""
    judge = LocalJudge(None, load_tokenizer(model), cfg, constitution, template, "check", model)
    request = JudgeRequest([{"role": "user", "content": "Name a colour."}], "Blue.", "Red.")
    text = judge.as_text(render_judge_prompt(judge.template, constitution, request, cfg.labels,
                                             "Both name one." if cfg.chain_of_thought else None))
    ids = judge.tokenize(text)
    for label in cfg.labels:
        label_token_id(judge.tokenize, ids, text, label)


class LocalJudge:
    def __init__(self, scorer: LabelScorer, tokenizer, cfg: AnnotateConfig, constitution: Constitution,
                 template: JudgeTemplate, backend: str, model: str):
        self.scorer, self.tokenizer, self.cfg, self.backend, self.model = scorer, tokenizer, cfg, backend, model
        self.specials = special_tokens(tokenizer)
        self.use_constitution(constitution, template)
        self.stats: dict[str, float] = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if cfg.chat_template == "always" and not has_template:
            raise ValueError(f"annotate.chat_template: 'always', but the judge {model} has no chat "
                             f"template; use 'auto' or 'never'")
        self.chat = cfg.chat_template == "always" or (cfg.chat_template == "auto" and has_template)

    @property
    def identity(self) -> Identity:
        c = self.constitution
        return Identity(self.backend, self.model, c.name, c.hash, self.template.hash)

    def use_constitution(self, constitution: Constitution, template: JudgeTemplate) -> None:
        self.constitution, self.template = constitution, dataclasses.replace(template, specials=self.specials)

    def as_text(self, prompt: str) -> str:
        """What the judge model reads: the raw prompt, or the prompt as the user turn of its
        chat template, open for the reply."""
        if not self.chat:
            return prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=False)

    def tokenize(self, text: str) -> list[int]:
        # A raw prompt gets the tokenizer's special tokens (a BOS where the model has one), as
        # an OpenAI-compatible completions server tokenizes it; a chat template writes its own.
        return self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"]

    def encode(self, prompt: str) -> list[int]:
        return self.tokenize(self.as_text(prompt))

    def judge(self, requests: list[JudgeRequest]) -> list[Answer]:
        cfg, labels = self.cfg, self.cfg.labels
        rationales: list[str | None] = [None] * len(requests)
        if cfg.chain_of_thought:
            prompts = [self.encode(rationale_prompt(self.template, self.constitution, r, labels)) for r in requests]
            fits = [i for i, ids in enumerate(prompts) if len(ids) + cfg.rationale_tokens <= cfg.max_prompt_tokens]
            for i, text in zip(fits, self.scorer.greedy([prompts[i] for i in fits], cfg.rationale_tokens)):
                rationales[i] = text
            self.stats["completion_tokens"] += len(fits) * cfg.rationale_tokens

        answers: list[Answer | None] = [None] * len(requests)
        batch, label_ids, where = [], [], []
        for i, r in enumerate(requests):
            if cfg.chain_of_thought and rationales[i] is None:
                answers[i] = Answer(None, "rationale prompt too long for annotate.max_prompt_tokens")
                continue
            text = self.as_text(render_judge_prompt(self.template, self.constitution, r, labels, rationales[i]))
            ids = self.tokenize(text)
            if len(ids) > cfg.max_prompt_tokens:
                answers[i] = Answer(None, f"judge prompt has {len(ids)} tokens > annotate.max_prompt_tokens")
                continue
            batch.append(ids)
            label_ids.append([label_token_id(self.tokenize, ids, text, lab) for lab in labels])
            where.append(i)
        scores = self.scorer.label_logprobs(batch, label_ids) if batch else []
        self.stats["requests"] += len(batch)
        self.stats["prompt_tokens"] += sum(map(len, batch))
        for i, (l1, l2, next_text) in zip(where, scores):
            why = f"rationale={rationales[i]!r} " if rationales[i] is not None else ""
            raw = f"{why}next={next_text!r} logp[{labels[0]}]={l1:.4f} logp[{labels[1]}]={l2:.4f}"
            ok = math.isfinite(l1) or math.isfinite(l2)
            mass = math.exp(l1) + math.exp(l2)
            answers[i] = Answer(two_label_probability(l1, l2) if ok else None, f"{raw} label_mass={mass:.4f}", mass)
        return answers
