"""The `vllm` backend: a local judge LLM in its own vLLM engine.

The judge prompt (template + constitution + conversation + both responses) ends where the
answer label goes; the probability that response 1 is better is the softmax over the two
label tokens' log-probs at that position (RLAIF §2.1, Constitutional AI §4.1). vLLM
returns exactly those two log-probs (`logprob_token_ids`), so no top-k cut-off applies.
Both orders of all pairs go to the engine in one batched call.
"""

from __future__ import annotations

import math

from oaif.annotate.base import Answer, JudgeRequest, JudgeTemplate, render_judge_prompt
from oaif.config import AnnotateConfig
from oaif.constitution import Constitution


def label_token_id(tokenizer, prefix_ids: list[int], prompt: str, label: str) -> int:
    """The single token that `label` adds right after `prompt` (tokenizers merge across
    boundaries, so the label is tokenized in place, not alone)."""
    ids = tokenizer(prompt + label, add_special_tokens=False)["input_ids"]
    if ids[:len(prefix_ids)] != prefix_ids or len(ids) != len(prefix_ids) + 1:
        raise ValueError(f"annotate.labels: {label!r} is not one token after the judge prompt for this "
                         f"tokenizer; pick labels that are (e.g. '1'/'2' or 'A'/'B')")
    return ids[-1]


class VLLMAnnotator:
    backend = "vllm"

    def __init__(self, llm, tokenizer, cfg: AnnotateConfig, constitution: Constitution, template: JudgeTemplate,
                 model_name: str):
        self.llm, self.tokenizer, self.cfg = llm, tokenizer, cfg
        self.constitution, self.template, self.model = constitution, template, model_name

    def judge(self, requests: list[JudgeRequest]) -> list[Answer]:
        from vllm import SamplingParams, TokensPrompt

        answers: list[Answer | None] = [None] * len(requests)
        batch, params, where = [], [], []
        for i, r in enumerate(requests):
            text = render_judge_prompt(self.template, self.constitution, r)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.cfg.max_prompt_tokens:
                answers[i] = Answer(None, f"judge prompt has {len(ids)} tokens > annotate.max_prompt_tokens")
                continue
            label_ids = [label_token_id(self.tokenizer, ids, text, lab) for lab in self.cfg.labels]
            batch.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=label_ids))
            where.append((i, label_ids))
        outputs = self.llm.generate(batch, params, use_tqdm=False) if batch else []
        for (i, label_ids), out in zip(where, outputs):
            c = out.outputs[0]
            logprobs = c.logprobs[0]
            l1, l2 = (logprobs[t].logprob for t in label_ids)
            if not (math.isfinite(l1) or math.isfinite(l2)):
                answers[i] = Answer(None, f"next={c.text!r} both label log-probs are -inf")
                continue
            top = max(l1, l2)
            p1 = math.exp(l1 - top) / (math.exp(l1 - top) + math.exp(l2 - top))
            answers[i] = Answer(p1, f"next={c.text!r} logp[{self.cfg.labels[0]}]={l1:.4f} "
                                    f"logp[{self.cfg.labels[1]}]={l2:.4f}")
        return answers
