"""What the selection proxy (oaif/annotate/proxy.py) reads of a response: the policy's own
view of it, one no-grad forward per sample, far cheaper than a judge call.

Per (prompt, response): the policy's last hidden state averaged over the response's tokens,
the hidden state at its last token (what the policy "concluded"), and log(1 + its length in
tokens) (judges are often swayed by length; a mean over tokens hides it). float32,
on the CPU, whatever the policy's device and dtype.
"""

from __future__ import annotations

import torch

from oaif.records import Sample
from oaif.train import batch_sequences


@torch.no_grad()
def pooled_features(model: torch.nn.Module, groups: list[list[Sample]], pad_id: int, batch_size: int = 32
                    ) -> list[torch.Tensor]:
    """One (n, 2·hidden + 1) tensor per group of samples. The model is read in eval mode
    (no dropout) and left in the mode it was in."""
    samples = [s for g in groups for s in g]
    device, training = next(model.parameters()).device, model.training
    rows = []
    model.eval()
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            ids, attention, response = batch_sequences([s.prompt_token_ids for s in chunk],
                                                       [s.token_ids for s in chunk], pad_id)
            hidden = model(input_ids=ids.to(device), attention_mask=attention.to(device), output_hidden_states=True,
                           logits_to_keep=1).hidden_states[-1].float().cpu()
            tokens = response.sum(1, keepdim=True)
            mean = (hidden * response[..., None]).sum(1) / tokens.clamp(min=1)
            last = hidden[torch.arange(len(chunk)), attention.sum(1) - 1]
            rows.append(torch.cat([mean, last, torch.log1p(tokens)], dim=1))
    finally:
        model.train(training)
    features = torch.cat(rows) if rows else torch.zeros(0, 0)
    return list(features.split([len(g) for g in groups]))
