"""Sampling a round from the current policy: prompts in, groups of Samples out.

The engine (oaif/engine) takes prompt token ids and returns the exact sampled token ids, so
the trainer never re-tokenizes. Every sample has its own seed, drawn from the
run's seed, the round and its place in the round (`sample_seeds`): what a round samples does not
depend on what the engine did before, so a resumed run samples what an uninterrupted one did.
(vLLM's `n` with one request seed gives correlated, even repeated, samples: each sample is
its own n=1 request.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from dataclasses import dataclass

from oaif.config import GenerateConfig
from oaif.engine.base import Completion, PolicyEngine
from oaif.engine.server import ServerEngine
from oaif.records import Prompt, Sample


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation plus the assistant turn opener (the policy's input): how
    the loop renders a prompt, and so how `oaif sft` renders the prompts it trains on."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompts(tokenizer, prompts: list[Prompt], max_prompt_tokens: int
                   ) -> tuple[list[tuple[Prompt, list[int]]], int]:
    """(prompt, token ids) of each prompt within max_prompt_tokens, and how many were left
    out: the same ones for every model with this tokenizer."""
    encoded = [(p, encode_prompt(tokenizer, p.messages)) for p in prompts]
    kept = [(p, ids) for p, ids in encoded if len(ids) <= max_prompt_tokens]
    return kept, len(encoded) - len(kept)


def round_prompts(prompts: list[Prompt], per_round: int, seed: int, skip: int = 0):
    """Endless stream of a run's prompt batches: each pass over the set in a new seeded order.
    skip: the batches of rounds already done (a resume)."""
    rng, queue, done = random.Random(seed), [], 0
    while True:
        batch = []
        while len(batch) < per_round:
            if not queue:
                queue = prompts[:]
                rng.shuffle(queue)
            batch.append(queue.pop())
        if done >= skip:
            yield batch
        done += 1


def sample_seeds(seed: int, stage: str, prompts: int, n: int) -> list[list[int]]:
    """n seeds per prompt for one stage of a run (a round, an evaluation): a hash of the run's
    seed, the stage and the sample's place, so no two samples share one and a rerun repeats them."""
    def one(j: int, k: int) -> int:
        digest = hashlib.sha256(f"{seed}/{stage}/{j}/{k}".encode()).digest()
        return int.from_bytes(digest[:4], "little") >> 1   # 31 bits: every server takes it
    return [[one(j, k) for k in range(n)] for j in range(prompts)]


@dataclass
class Pending:
    """A round's sample request: what the engine is asked, and what turns its completions
    into Samples."""
    round: int
    policy_version: int
    kept: list[tuple[Prompt, list[int]]]   # (prompt, its token ids) within max_prompt_tokens
    seeds: list[list[int]]
    skipped: int                           # prompts over max_prompt_tokens
    t0: float                              # when the engine was asked


@dataclass
class Drawn:
    """async_rounds: a round's samples already drawn (collected for a checkpoint, or read back
    from one), so a resumed run trains on the very samples an uninterrupted one would."""
    round: int
    groups: list[list[Sample]]
    metrics: dict

    def saved(self) -> dict:
        return {"round": self.round, "metrics": self.metrics,
                "groups": [[dataclasses.asdict(s) for s in g] for g in self.groups]}

    @classmethod
    def from_saved(cls, saved: dict) -> "Drawn":
        return cls(saved["round"], [[Sample(**s) for s in g] for g in saved["groups"]], saved["metrics"])


class Generator:
    """A round's samples from the policy the engine holds. With async_rounds the next round's
    are requested (`submit`) as soon as this round's are in, and drawn while the caller trains."""
    def __init__(self, engine: PolicyEngine, tokenizer, cfg: GenerateConfig, max_prompt_tokens: int, seed: int = 0):
        self.engine, self.tokenizer, self.cfg = engine, tokenizer, cfg
        self.max_prompt_tokens, self.seed = max_prompt_tokens, seed
        self.pending: Pending | Drawn | None = None   # a submitted round's request, or its samples

    def encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt.messages)

    def sample(self, prompts: list[Prompt], round: int, policy_version: int) -> tuple[list[list[Sample]], dict]:
        """samples_per_prompt samples per prompt; prompts over max_prompt_tokens are skipped.
        The round's submitted samples if there are any (a request in flight is finished first,
        whether this round uses it or not)."""
        drawn, self.pending = self.drawn(), None
        if drawn is not None and drawn.round == round:
            return drawn.groups, drawn.metrics
        pending = self._pending(prompts, round, policy_version)
        return self._samples(pending, self.engine.sample(*self._request(pending)))

    def submit(self, prompts: list[Prompt], round: int, policy_version: int) -> None:
        """Asks the engine for a round's samples; an engine in its own process returns at once
        and draws them while the caller goes on (trains); sample() for that round takes them."""
        self.pending = self._pending(prompts, round, policy_version)
        self.engine.submit(*self._request(self.pending))

    def drawn(self) -> Drawn | None:
        """The submitted round's samples (waiting for them if they are still being drawn), kept
        for their round; None if nothing was submitted."""
        if isinstance(self.pending, Pending):
            self.pending = Drawn(self.pending.round, *self._samples(self.pending, self.engine.collect()))
        return self.pending

    def saved(self) -> dict:
        """What a checkpoint keeps of the generator: async_rounds' next round's samples. They
        were drawn from the weights before this round's update; a resume could not draw them
        again (the checkpoint holds the newer weights), so they are collected now and saved."""
        drawn = self.drawn()
        return {"next_round": drawn.saved()} if drawn is not None else {}

    def _pending(self, prompts: list[Prompt], round: int, policy_version: int) -> Pending:
        """The request for a round, made just before the engine is asked (its clock starts)."""
        kept, skipped = encode_prompts(self.tokenizer, prompts, self.max_prompt_tokens)
        seeds = sample_seeds(self.seed, f"round {round}", len(kept), self.cfg.samples_per_prompt)
        return Pending(round, policy_version, kept, seeds, skipped, time.perf_counter())

    def _request(self, pending: Pending) -> tuple:
        """The engine's sample arguments."""
        cfg = self.cfg
        return [ids for _, ids in pending.kept], pending.seeds, cfg.temperature, cfg.top_p, cfg.max_new_tokens

    def _samples(self, pending: Pending, outputs: list[list[Completion]]) -> tuple[list[list[Sample]], dict]:
        seconds = time.perf_counter() - pending.t0
        groups = [[Sample(round=pending.round, policy_version=pending.policy_version, prompt_id=prompt.id,
                          messages=prompt.messages, index=k, text=text, prompt_token_ids=ids, token_ids=token_ids,
                          finish_reason=finish, references=list(prompt.references))
                   for k, (token_ids, text, finish) in enumerate(completions)]
                  for (prompt, ids), completions in zip(pending.kept, outputs)]
        lengths = [len(s.token_ids) for g in groups for s in g]
        metrics = {
            "generate/mean_length": sum(lengths) / len(lengths) if lengths else None,
            # From the request to its results: with asynchronous rounds this spans the
            # training the sampling overlapped.
            "generate/tokens_per_s": sum(lengths) / seconds if seconds > 0 else None,
            "generate/truncated_rate": (sum(s.finish_reason == "length" for g in groups for s in g) / len(lengths)
                                        if lengths else None),
            "generate/prompts_skipped": pending.skipped,
            # Of several servers, those still answering (generate.server_drop_dead drops the others).
            **({"generate/servers": len(self.engine.servers)}
               if isinstance(self.engine, ServerEngine) and self.engine.configured > 1 else {}),
        }
        return groups, metrics

    def greedy(self, token_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (for checks and evaluation)."""
        return self.engine.greedy(token_ids, max_new_tokens)
