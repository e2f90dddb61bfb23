"""The `transformers` backend: a local judge model run with transformers, batched.

Same prompt and same label read-out as the vllm backend (annotate/local.py), for machines
or models where vLLM is not wanted.
"""

from __future__ import annotations

import torch

from oaif.annotate.base import JudgeTemplate
from oaif.annotate.local import LocalJudge
from oaif.config import AnnotateConfig
from oaif.constitution import Constitution
from oaif.models import load_causal_lm


class TransformersScorer:
    def __init__(self, model, tokenizer, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def left_padded(self, prompts: list[list[int]]):
        """Left padding puts every prompt's last token in the last column."""
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        device = next(self.model.parameters()).device
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[str]:
        texts = []
        for s in range(0, len(prompts), self.batch_size):
            ids, mask = self.left_padded(prompts[s:s + self.batch_size])
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=self.pad_id)
            texts += self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        return texts

    @torch.no_grad()
    def label_logprobs(self, prompts: list[list[int]], label_ids: list[list[int]]) -> list[tuple[float, float, str]]:
        result = []
        for s in range(0, len(prompts), self.batch_size):
            ids, mask = self.left_padded(prompts[s:s + self.batch_size])
            # Positions must count from each prompt's first real token, as without padding.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
            logps = logits.log_softmax(-1)
            for row, labels in zip(logps, label_ids[s:s + self.batch_size]):
                next_text = self.tokenizer.decode([int(row.argmax())])
                result.append((row[labels[0]].item(), row[labels[1]].item(), next_text))
        return result


def transformers_judge(cfg: AnnotateConfig, model: str, constitution: Constitution, template: JudgeTemplate,
                          device: str = "cpu") -> LocalJudge:
    from transformers import AutoTokenizer


    tokenizer = AutoTokenizer.from_pretrained(model)
    scorer = TransformersScorer(load_causal_lm(model, cfg.dtype, trainable=False, device=device), tokenizer,
                                cfg.batch_size)
    return LocalJudge(scorer, tokenizer, cfg, constitution, template, "transformers", model)
