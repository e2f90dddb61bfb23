"""Typed run configuration: frozen dataclasses, loaded from YAML plus `a.b=c` overrides.

Every field carries its help text in `metadata["help"]`; `oaif config-help` prints them.
Loading gathers every problem (unknown key, wrong type, bad value) into one `ConfigError`
that names each dotted path and suggests the nearest known key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import ipaddress
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from oaif.bundled import resolve_against
from oaif.objectives import LOSSES, SETTING_OWNERS


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def must_be_positive(prefix: str, values: dict) -> list[str]:
    """One error line per value that is not > 0, named by its dotted key (prefix + name)."""
    return [f"{prefix}{k}: must be > 0, got {v}" for k, v in values.items() if v <= 0]


def must_not_be_negative(prefix: str, values: dict) -> list[str]:
    """One error line per value that is < 0, named by its dotted key (prefix + name)."""
    return [f"{prefix}{k}: must be >= 0, got {v}" for k, v in values.items() if v < 0]


@dataclass(frozen=True)
class PolicyConfig:
    model: str = _f("models/tiny", "Path or hub id of the policy to train (loaded with from_pretrained and vllm.LLM).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Dtype of the vLLM engine, the frozen reference and the training forward passes (autocast). Trained weights stay float32 (master weights) so small updates are not rounded away. 'auto': bfloat16 where the hardware computes it natively (a CUDA device with bf16; a CPU with AMX or AVX512-BF16), else float32; decided once per start, printed with its reason and recorded as startup/dtype (docs/benchmarks.md has the measurements); oaif export then writes float32. An explicit dtype always wins.")
    max_prompt_tokens: int = _f(256, "Prompts longer than this (after the chat template) are skipped, with a count.")
    device: str = _f("auto", "Training device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    chat_template: str = _f("", "For a model without a chat template (a base model): a Jinja chat template file, or the bundled 'plain' ('User: ...' / 'Assistant: ...' turns). Empty: the tokenizer's own. Saved with every checkpoint's tokenizer.")

    def problems(self) -> list[str]:
        if self.max_prompt_tokens <= 0:
            return [f"policy.max_prompt_tokens: must be > 0, got {self.max_prompt_tokens}"]
        return []


@dataclass(frozen=True)
class GenerateConfig:
    samples_per_prompt: int = _f(2, "Responses sampled per prompt; OAIF uses 2 (one pair).")
    temperature: float = _f(0.9, "Sampling temperature (OAIF paper: 0.9). Must be > 0: greedy gives n=1 only.")
    top_p: float = _f(1.0, "Nucleus sampling mass.")
    max_new_tokens: int = _f(64, "Token limit per response; a response that hits it has finish_reason 'length'.")
    kv_cache_gib: float = _f(1.0, "KV cache reserved by the policy's vLLM engine (GiB). vLLM's CPU default takes most of RAM.")
    tensor_parallel_size: int = _f(1, "vLLM tensor parallelism for the policy engine: the model is split across this many GPUs or, on a CPU, worker processes, each bound to an equal share of the cores this process may use (one at least; VLLM_CPU_OMP_THREADS_BIND, if set, binds them instead).")
    enforce_eager: bool | None = _f(None, "Skip vLLM's graph compilation/capture: faster engine start, slower generation. Unset: skipped on a CPU, where compiling costs ~12 s for the tiny model and minutes for SmolLM2 and gains ~20% generation speed (README benchmarks), done on a GPU.")
    server_url: str = _f("", "Server mode: sample from the running vLLM OpenAI-compatible server at this URL instead of an in-process engine (one server; several: generate.server_urls). Start it as docs/guides/multi-node.md shows.")
    server_urls: tuple[str, ...] = _f((), "Server mode with several servers: prompts are split across them and each gets the same weights every round (not with server_url).")
    server_api_key_env: str = _f("", "Server mode: NAME of the environment variable holding the servers' key (started with VLLM_API_KEY and --middleware oaif.engine.server.RequireKey: see docs/guides/multi-node.md), sent with every request, weight pushes included; the key never enters config, logs or records. Same naming rule as annotate.openai.api_key_env. Empty: no key sent. A server oaif starts itself gets a random key of its own.")
    server_weight_sync: Literal["wire", "path"] = _f("wire", "Server mode: how each round's weights reach the servers. 'wire': over the network through vLLM's weight-transfer API (NCCL on GPUs, oaif's gloo engine on CPUs; each server started with --weight-transfer-config and reachable back from it, see docs/guides/multi-node.md); the server reads no file of the trainer. 'path': the fallback for a server that cannot be started so: the weights are saved in server_weights_dir and the server reloads them from there (same node, or a shared filesystem).")
    server_weights_dir: str = _f("/dev/shm", "Server mode with server_weight_sync 'path': where each round's weights are saved for the servers to reload (must be readable by them).")
    server_drop_dead: bool = _f(False, "Server mode with several servers: a server that stops answering is dropped (a line on the terminal; generate/servers counts those left) and the run goes on with the others. false: the run stops with a checkpoint, to be resumed once the server is back.")
    gpu_memory_utilization: float = _f(0.4, "GPU only: share of GPU memory for the policy engine (the trainer needs the rest).")
    turns: int = _f(1, "Conversation turns per prompt. N > 1: before the pair is sampled, N-1 times the policy answers the conversation (one seeded sample) and generate.user_simulator writes the user's next message; the pair then answers turn N with the earlier turns as shared context, kept in each record's messages (oaif/conversation.py). A conversation that outgrows policy.max_prompt_tokens on the way is dropped, counted in generate/conversations_skipped. 1: the prompt as it is.")
    user_simulator: Literal["policy"] = _f("policy", "turns > 1: who writes the user's next messages: 'policy' (the policy itself, given generate.user_simulator_template).")
    user_simulator_template: str = _f("user_simulator", "turns > 1: the user simulator's instruction, a text file; {conversation} in it is replaced by the conversation so far (its user and assistant turns: the system prompt is the assistant's alone).")

    def problems(self) -> list[str]:
        # samples_per_prompt is checked by RunConfig: what it may be depends on annotate.ranking.
        errors = must_be_positive("generate.",
                  {"max_new_tokens": self.max_new_tokens, "kv_cache_gib": self.kv_cache_gib, "turns": self.turns})
        if not 0 < self.top_p <= 1:
            errors.append(f"generate.top_p: must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            errors.append("generate.temperature: must be > 0 (vLLM allows only one greedy sample per prompt)")
        errors += [e for e in (key_env_problem(self.server_api_key_env, "generate.server_api_key_env"),
                               *(url_problem(url, f"generate.{key}", self.server_api_key_env,
                                             "generate.server_api_key_env") for key, url in self._urls())) if e]
        if self.server_url and self.server_urls:
            errors.append("generate.server_urls: set server_url (one server) or server_urls (several), not both")
        if len(set(self.servers())) < len(self.servers()):
            errors.append("generate.server_urls: a server is listed twice")
        return errors

    def _urls(self) -> list[tuple[str, str]]:
        return [("server_url", self.server_url)] * bool(self.server_url) + [("server_urls", u) for u in self.server_urls]

    def servers(self) -> list[str]:
        """The URLs of the servers the policy is sampled from (none: oaif's own engine)."""
        return [url for _, url in self._urls()]


@dataclass(frozen=True)
class OpenAIConfig:
    base_url: str = _f("https://api.openai.com/v1", "Endpoint of any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama).")
    api_key_env: str = _f("OPENAI_API_KEY", "NAME of the environment variable holding the key (the key never enters config, logs or records). It must end in _KEY and hold none of the words SECRET, ACCESS, PRIVATE, PASSWORD, TOKEN, SSH, GPG, SIGNING (so a shared config cannot send HF_TOKEN or AWS_SECRET_ACCESS_KEY to its endpoint). Unset variable, or empty name: no key sent. A key is never sent over plain http to a host other than this machine (an error), and base_url must hold no credentials (user:password@, a query string).")
    endpoint: Literal["chat", "completions"] = _f("chat", "'chat': the judge prompt as a user message; 'completions': the raw prompt, scored exactly like the local backends.")
    mode: Literal["logprob", "text"] = _f("logprob", "'logprob': one token, P from the two label tokens' log-probs; 'text': the judge writes an answer ending in a fixed final line, which is parsed.")
    top_logprobs: int = _f(20, "logprob mode: how many top tokens to ask for (a label outside them counts as at most the smallest one).")
    max_tokens: int = _f(512, "text mode: answer length limit.")
    temperature: float = _f(0.0, "text mode: sampling temperature of the judge.")
    max_concurrency: int = _f(8, "Requests in flight at once.")
    timeout_s: float = _f(60.0, "Per-request timeout (seconds).")
    max_retries: int = _f(4, "Retries of a failed request (timeouts, 429, 5xx, malformed bodies) before it counts as invalid.")
    backoff_s: float = _f(1.0, "First retry delay; doubles each retry. A 429's Retry-After overrides it.")
    price_per_mtok_input: float = _f(0.0, "The API's price of a million prompt (input) tokens, in any currency, for the metrics judge/cost_per_pair (money per kept pair) and annotate/api_cost (per round), from the token counts in the API's replies. 0 with price_per_mtok_output 0: no cost metrics.")
    price_per_mtok_output: float = _f(0.0, "The API's price of a million completion (output) tokens, in the same currency as price_per_mtok_input.")


@dataclass(frozen=True)
class MixMember:
    backend: Literal["rules", "vllm", "openai", "transformers", "python", "reward_model"] = _f("rules", "This member's backend.")
    constitution: str = _f("", "This member's constitution file (empty: annotate.constitution).")
    python: str = _f("", "backend 'python': this member's judge function, as annotate.python.")
    model: str = _f("", "This member's judge model (LLM and reward_model backends; empty: annotate.model).")
    weight: float = _f(1.0, "Weight of this member's probability in the mix.")


@dataclass(frozen=True)
class CanaryConfig:
    every: int = _f(0, "oaif run: re-judge the canary pairs every N rounds (rounds 0, N, 2N, ...) with the run's own annotator, its judgment cache bypassed, and record judge/canary_accuracy (the share the judge gets right) and judge/canary_change (the share whose verdict changed since the run's first check; a resumed run counts from its first check after the resume) in metrics.jsonl. The judge's requests for them count in that round's annotate/* stats. `oaif annotate` judges them too. Not read in eval.annotate. 0: off.")
    pairs: str = _f("", "The canary pairs: a JSONL file of labelled pairs as `oaif annotate` reads them ({prompt, a, b, correct: a or b}, optional references), or a bundled constitution's name for its set (oaif/data/canaries). Empty: the bundled set of annotate.constitution's `name`, none (no check) for a constitution without one.")

    def problems(self, where: str) -> list[str]:
        return [f"{where}.canary.every: must be >= 0 (0: off), got {self.every}"] if self.every < 0 else []


@dataclass(frozen=True)
class SelectConfig:
    rule: Literal["random", "max_margin", "uncertain", "sea"] = _f(
        "random", "Which of a prompt's responses the judge compares (oaif/annotate/select.py): 'random' pairs (0,1), (2,3), ... of the samples as drawn (OAIF; today's behaviour); with generate.samples_per_prompt > 2, a proxy (an ensemble of linear Bradley-Terry heads on the policy's pooled hidden states, refit every round on the judge's verdicts so far) scores every response and the judge sees only: 'max_margin' the proxy's best against its worst; 'uncertain' the pair its heads disagree on most; 'sea' one head's best (Thompson sampling) against the response whose comparison with it is most uncertain (SEA, Liu et al. 2024).")
    comparisons_per_prompt: int = _f(1, "rule max_margin / uncertain / sea: comparisons (each judged in both orders) per prompt, the most informative first; 'random' judges every consecutive pair.")
    heads: int = _f(8, "The proxy's ensemble: linear heads, each fit on a bootstrap resample of the judged pairs; their disagreement is the proxy's uncertainty.")
    window: int = _f(2048, "The proxy trains on the most recent N judged pairs that the judge's orders agreed on.")
    steps: int = _f(200, "Adam steps of a proxy fit (all heads at once, full batch), every round.")
    learning_rate: float = _f(0.05, "The proxy fit's Adam learning rate.")
    l2: float = _f(0.01, "The proxy heads' L2 penalty (on standardised features): a few pairs cannot make it certain.")

    def problems(self, where: str) -> list[str]:
        errors = must_be_positive(f"{where}.select.",
                  {"comparisons_per_prompt": self.comparisons_per_prompt, "heads": self.heads, "window": self.window,
                   "steps": self.steps, "learning_rate": self.learning_rate})
        return errors + must_not_be_negative(f"{where}.select.", {"l2": self.l2})


@dataclass(frozen=True)
class BudgetConfig:
    calls_per_round: int = _f(0, "oaif run: at most this many judge calls per round (a comparison is 2 calls, one per order), spent by annotate.select.rule on its most informative comparisons first; an answer from the judgment cache counts too (tokens_total and cost_total count what the API billed). 0: no cap.")
    calls_total: int = _f(0, "oaif run: the run's judge calls; once fewer than one comparison's (2) are left, the run ends after that round with a checkpoint and a line saying so (raise it, then `oaif resume`, to go on). 0: no cap.")
    tokens_total: int = _f(0, "oaif run, backend openai: the run ends (as calls_total) after the round in which the API's billed tokens reach this; the last round may pass it by up to one round's tokens (cap that with calls_per_round). 0: no cap.")
    cost_total: float = _f(0.0, "oaif run, backend openai: the same for money, at annotate.openai.price_per_mtok_*. 0: no cap.")

    def problems(self, where: str) -> list[str]:
        errors = [f"{where}.budget.{k}: must be >= 0 (0: no cap), got {v}" for k, v in
                  {"calls_per_round": self.calls_per_round, "calls_total": self.calls_total,
                   "tokens_total": self.tokens_total, "cost_total": self.cost_total}.items() if v < 0]
        errors += [f"{where}.budget.{k}: {v} is less than one comparison (2 calls, one per order); set >= 2 or 0 "
                   f"(no cap)" for k, v in {"calls_per_round": self.calls_per_round,
                                            "calls_total": self.calls_total}.items() if v == 1]
        return errors


@dataclass(frozen=True)
class AnnotateConfig:
    backend: Literal["rules", "vllm", "openai", "transformers", "python", "reward_model", "mix"] = _f(
        "rules", "Annotator: 'rules' (checks in the constitution), 'vllm' (local judge in vLLM), 'openai' (any OpenAI-compatible API), 'transformers' (local judge in transformers), 'python' (your function, annotate.python), 'reward_model' (a Bradley-Terry reward model from `oaif train-rm`, annotate.model; it ignores the constitution), 'mix' (weighted mix of annotate.mix).")
    python: str = _f("", "backend 'python': your judge, 'module:function' (importable, or from the working directory) or 'path/to/file.py:function'. judge(prompt_messages, response_1, response_2) -> P(response 1 better) in [0, 1], or None for 'cannot judge'; decorate with @oaif.batched for judge(prompts, responses_1, responses_2) -> list. An object with the annotator Protocol (judge(requests) -> answers) also works.")
    python_cache: bool = _f(False, "backend 'python': keep your judge's answers in annotate.cache too. Off by default: a function can change without its source changing (e.g. it calls a service).")
    reload_constitution: bool = _f(False, "oaif run: re-read the constitution file(s) at the start of every round and judge with an edited one from that round on (recorded by hash in every judgment). A broken edit is refused with a warning and the previous version stays in use.")
    constitution: str = _f("concise", "Constitution: a bundled one by name (oaif constitutions lists them) or a file of yours: the principles (and rule checks) that define 'better'.")
    template: str = _f("judge", "Judge prompt template for LLM backends. Placeholders: {preamble} {principles} {examples} {prompt} {response_1} {response_2}; its last line is the answer prefix.")
    model: str = _f("", "Judge model: a local path or hub id (vllm, transformers) or the API's model name (openai). Empty: the policy's starting model. backend 'reward_model': the folder `oaif train-rm` wrote (required).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f("float32", "Local judge model dtype. 'auto': as policy.dtype's. float32 by default: whether bfloat16 changes a judge's verdicts has not been measured.")
    labels: tuple[str, str] = _f(("1", "2"), "The two answer labels, first then second; the judge's answer is read as one of them.")
    principles: Literal["all", "sample"] = _f("all", "'all' principles in every judge prompt, or one 'sample'd per comparison (Constitutional AI); both orders of a pair get the same one.")
    chain_of_thought: bool = _f(False, "LLM backends: the judge first writes a rationale (greedy), then the label is read after it (RLAIF §2.1.2).")
    rationale_tokens: int = _f(128, "chain_of_thought: rationale length limit (tokens).")
    max_prompt_tokens: int = _f(1024, "Judge prompts longer than this are judged invalid (counted, never truncated).")
    batch_size: int = _f(16, "transformers backend: judge prompts per forward pass; reward_model backend: responses scored per forward pass.")
    cache: str = _f("runs/judge_cache.jsonl", "Judgment cache file (LLM backends), keyed by (backend, model, constitution hash, template hash, settings, prompt, both responses); shared by runs so a repeated or resumed run does not pay twice. Empty: no cache.")
    kv_cache_gib: float = _f(1.0, "KV cache reserved by the judge's vLLM engine (GiB).")
    enforce_eager: bool | None = _f(None, "Judge engine: skip vLLM's graph compilation (faster start). Unset: skipped on a CPU, done on a GPU.")
    gpu_memory_utilization: float = _f(0.3, "GPU only: share of GPU memory for the judge engine.")
    chat_template: Literal["auto", "always", "never"] = _f(
        "auto", "Local judges (vllm, transformers): send the judge prompt as the user turn of the judge model's chat template and read the label at the start of its reply, as the openai chat endpoint does. 'auto': when the judge's tokenizer has a chat template; 'never': the raw prompt.")
    max_invalid_rate: float = _f(0.5, "oaif run: stop (with a checkpoint of the last round, resumable) when more than this share of a round's pairs get an invalid judgment (endpoint down, prompts over max_prompt_tokens, labels never read), instead of training on what is left. 1: never stop.")
    ranking: Literal["consecutive", "round_robin", "knockout"] = _f(
        "consecutive", "How a prompt's generate.samples_per_prompt responses are compared, each comparison in both orders: 'consecutive' pairs (0,1), (2,3), ... (OAIF, n = 2); 'round_robin' every pair, n(n-1)/2 comparisons, ranked by summed P(better); 'knockout' single elimination for best and worst, about 1.5n comparisons (oaif/annotate/ranking.py).")
    pairs: Literal["best_worst", "all"] = _f(
        "best_worst", "round_robin / knockout: train on one pair per prompt, best against worst, kept when that comparison agreed (Self-Rewarding, online iterative RLHF), or on 'all' agreeing comparisons (RRHF-style).")
    length_debias_window: int = _f(0, "oaif run: fit the judge's preference for length over the last N judged pairs (this round's included) and take it off every answer before the orders are combined (oaif/annotate/length.py, after AlpacaEval's length control), so a verbose- or terse-biased judge stops steering length on its own; judge/length_effect records the fitted effect. For judges that answer with a probability (LLM label probabilities, reward models, your function); a resume refills the window from the run's judgments. 0: off.")
    missing_eos_penalty: float = _f(0.0, "Subtract this from the judge's logit for a response cut off by generate.max_new_tokens (no EOS), in both orders; e.g. 20 makes a truncated response lose to a finished one. 0: off.")
    min_label_mass: float = _f(0.0, "LLM judges: an answer whose next-token probability on the two labels is below this is invalid (counted in annotate/invalid_rate and annotate/below_label_mass), not a verdict: a judge saying something else than a label is not answering. Judges that report no label mass (rules, python, reward_model) are never below it. 0: off.")
    select: SelectConfig = field(default_factory=SelectConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    mix: tuple[MixMember, ...] = _f((), "backend 'mix': the members, e.g. [{backend: vllm, constitution: constitutions/helpful.yaml, weight: 0.7}, {backend: rules, constitution: constitutions/code.yaml, weight: 0.3}]. P(first better) is the weighted mean of the members'; any invalid member makes the answer invalid.")

    def problems(self, where: str = "annotate") -> list[str]:
        """`where`: the section's dotted path, 'annotate' or 'eval.annotate' (the same keys)."""
        errors = []
        if not 0 <= self.max_invalid_rate <= 1:
            errors.append(f"{where}.max_invalid_rate: must be in [0, 1], got {self.max_invalid_rate}")
        if self.length_debias_window < 0:
            errors.append(f"{where}.length_debias_window: must be >= 0 (0: off), got {self.length_debias_window}")
        errors += must_not_be_negative(f"{where}.", {"missing_eos_penalty": self.missing_eos_penalty})
        if not 0 <= self.min_label_mass < 1:
            errors.append(f"{where}.min_label_mass: must be in [0, 1) (0: off), got {self.min_label_mass}")
        if self.labels[0] == self.labels[1]:
            errors.append(f"{where}.labels: the two labels must differ")
        if self.backend == "python" and not self.python:
            errors.append(f"{where}.python: backend 'python' needs your judge as 'module:function' or "
                          f"'file.py:function' (or pass annotator= to oaif.run)")
        errors += [f"{where}.mix[{i}].python: backend 'python' needs 'module:function'"
                   for i, m in enumerate(self.mix) if m.backend == "python" and not m.python]
        if self.backend == "reward_model" and not self.model:
            errors.append(f"{where}.model: backend 'reward_model' needs the folder `oaif train-rm` wrote")
        errors += [f"{where}.mix[{i}].model: backend 'reward_model' needs the folder `oaif train-rm` wrote "
                   f"(or set {where}.model)" for i, m in enumerate(self.mix)
                   if m.backend == "reward_model" and not (m.model or self.model)]
        if self.backend == "mix" and not self.mix:
            errors.append(f"{where}.mix: backend 'mix' needs at least one member")
        errors += [f"{where}.mix[{i}].weight: must be > 0" for i, m in enumerate(self.mix) if m.weight <= 0]
        o = self.openai
        errors += [f"{where}.openai.{k}: must be > 0" for k, v in
                   {"max_concurrency": o.max_concurrency, "timeout_s": o.timeout_s, "top_logprobs": o.top_logprobs,
                    "max_tokens": o.max_tokens}.items() if v <= 0]
        if o.max_retries < 0:
            errors.append(f"{where}.openai.max_retries: must be >= 0")
        errors += must_not_be_negative(f"{where}.openai.", {"price_per_mtok_input": o.price_per_mtok_input,
                                                              "price_per_mtok_output": o.price_per_mtok_output})
        errors += [e for e in (key_env_problem(o.api_key_env, f"{where}.openai.api_key_env"),
                               url_problem(o.base_url, f"{where}.openai.base_url", o.api_key_env,
                                           f"{where}.openai.api_key_env")) if e]
        if where == "eval.annotate" and (self.select != SelectConfig() or self.budget != BudgetConfig()):
            errors.append("eval.annotate.select / budget: the evaluation judges every held-out pair; set these under "
                          "annotate (the training judge) instead")
        return errors + self.canary.problems(where) + self.select.problems(where) + self.budget.problems(where)


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = _f(False, "Train a LoRA adapter (peft) instead of all weights.")
    r: int = _f(16, "LoRA rank.")
    alpha: int = _f(32, "LoRA alpha (scale = alpha / r).")
    dropout: float = _f(0.0, "LoRA dropout (0: the sampled policy and the trained one stay the same function).")
    target_modules: tuple[str, ...] = _f(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                         "Module names that get adapters.")
    adapter: str = _f("", "Start from this trained adapter (path). The reference is then a frozen copy of base+adapter; with a fresh adapter it is the base with the adapter disabled.")
    sync: Literal["merge", "vllm_lora"] = _f("merge", "How LoRA weights reach vLLM: 'merge' (merge, push the merged weights, unmerge; measured faster here) or 'vllm_lora' (vLLM's own LoRA loading, a new adapter id per round).")

    def problems(self) -> list[str]:
        errors = []
        if self.r <= 0:
            errors.append(f"train.lora.r: must be > 0, got {self.r}")
        if self.adapter and not self.enabled:
            errors.append("train.lora.adapter: set train.lora.enabled=true to start from an adapter")
        return errors


@dataclass(frozen=True)
class TrainConfig:
    loss: Literal["dpo", "cdpo", "soft", "ipo", "slic", "kto", "orpo", "simpo", "sft", "rloo"] = _f(
        "dpo", "Loss: dpo, cdpo (label smoothing), soft (annotator probability as target), ipo, slic (OAIF compares dpo/ipo/slic), kto (each response desirable/undesirable), orpo, simpo (reference-free: no reference model is loaded, no train/kl_to_ref or eval/kl_to_ref), sft (the chosen response's NLL alone, reference-free: with annotate.ranking, rejection-sampling fine-tuning on the best response), rloo (policy gradient: the annotator's preference as reward, the other sample as baseline, PPO's clipped ratio, β the KL penalty).")
    beta: float | None = _f(None, "Loss temperature; for orpo the weight λ of the odds-ratio term, for rloo the KL penalty's coefficient. Empty: the default for the loss (dpo/cdpo/soft/kto 0.1, ipo 1.0, slic 0.002 from the OAIF paper; orpo λ 0.1, simpo 2.0, rloo 0.05; sft has none).")
    label_smoothing: float = _f(0.1, "cdpo: the probability that a label is flipped (ε).")
    margin_scale: float = _f(0.0, "dpo/cdpo/soft: subtract scale·(2p−1) from βh, p = the annotator's P(chosen better) (Llama 2's margin idea). 0: off.")
    kto_desirable_weight: float = _f(1.0, "kto: λD.")
    kto_undesirable_weight: float = _f(1.0, "kto: λU.")
    ppo_clip: float = _f(0.2, "rloo: PPO's clipping range ε for the ratio π/π_old (Schulman et al. 2017); it bites when a round's pairs take more than one optimizer step (train.epochs_per_round > 1 or more pairs than train.batch_size).")
    simpo_gamma: float = _f(1.0, "simpo: the target reward margin γ (Meng et al. 2024; 1.0 is their β 2.0 with γ/β 0.5).")
    length_normalize: bool = _f(False, "Average response log-probs over tokens instead of summing them (orpo and simpo always do: their equations are per token).")
    learning_rate: float = _f(5e-7, "AdamW learning rate (OAIF paper: 5e-7 for PaLM 2; tiny models need far more).")
    lr_schedule: Literal["constant", "linear", "cosine"] = _f("constant", "Learning-rate schedule after warm-up, over the run's estimated optimizer steps.")
    warmup_steps: int = _f(0, "Linear warm-up steps (OAIF paper: 150).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    batch_size: int = _f(64, "Pairs per optimizer step; a round's pairs are split into steps of this size.")
    micro_batch_size: int = _f(8, "Pairs per forward/backward pass (gradient accumulation up to batch_size).")
    bucket_by_length: bool = _f(True, "Cut each optimizer step's micro-batches from its pairs ordered by length (the longer of prompt + chosen and prompt + rejected, which share a batch), so that a micro-batch pads only to similar lengths; the step's gradient is the same sum. Pays only when micro_batch_size < batch_size. train/padding_share reports the padded share of the training passes' positions.")
    reference_batch_size: int = _f(0, "Pairs per pass of the reference (and, rloo, of the policy as the round began): those log-probs are computed for all of a round's pairs before its first step, without gradients, longest pairs first. A pass without gradients keeps no activations for a backward pass, so it fits more pairs than a training pass: a larger size gives fewer, fuller passes for more memory while they run. 0: micro_batch_size. Reference-free losses (orpo, simpo, sft) run no such pass.")
    compile: bool = _f(False, "torch.compile the policy's training forward (inductor, dynamic shapes; on a CPU it needs a C++ compiler). The compilation is paid in the first round (its train/seconds), and again when a shape it has not seen forces a recompile. Single process only.")
    epochs_per_round: int = _f(1, "Passes over each round's pairs.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    disable_dropout: bool = _f(True, "Set every dropout in the policy to 0, so the policy that is trained is the one that sampled.")
    gradient_checkpointing: bool = _f(False, "Keep only each layer's input for the backward pass and recompute the rest (transformers' gradient checkpointing): the training activations shrink about (8·hidden + 4·intermediate) / hidden times, for about one more forward pass of compute per step. For a model or micro-batch whose activations do not fit (check_memory counts them).")
    check_replicas: bool = _f(False, "Multi-process (DDP): after every optimizer step, compare a hash of every rank's parameters, write them to replicas.jsonl and stop if they differ. Costs one pass over the weights per step.")
    checkpoint_every: int = _f(5, "Save a checkpoint every N rounds (0: only after the last round). A checkpoint is also written after the last round and when SIGINT/SIGTERM stops a run.")
    keep_checkpoints: int = _f(3, "Keep the newest N checkpoints; older ones are deleted once a newer one is whole (0: keep all).")
    lora: LoraConfig = field(default_factory=LoraConfig)

    def problems(self) -> list[str]:
        errors = must_be_positive("train.",
                  {"batch_size": self.batch_size, "micro_batch_size": self.micro_batch_size,
                   "epochs_per_round": self.epochs_per_round})
        # Settings of one loss given to another would silently do nothing (objectives.py says whose they are).
        unset = TrainConfig()
        errors += [setting.error(owners, self.loss) for setting, owners in SETTING_OWNERS.items()
                   if self.loss not in owners and any(getattr(self, k) != getattr(unset, k) for k in setting.keys)]
        if not 0 < self.ppo_clip < 1:
            errors.append(f"train.ppo_clip: must be in (0, 1), got {self.ppo_clip}")
        if self.simpo_gamma < 0:
            errors.append(f"train.simpo_gamma: must be >= 0 (a target margin), got {self.simpo_gamma}")
        if self.keep_checkpoints < 0 or self.checkpoint_every < 0:
            errors.append("train.keep_checkpoints, train.checkpoint_every: must be >= 0")
        if self.learning_rate <= 0:
            errors.append(f"train.learning_rate: must be > 0, got {self.learning_rate}")
        if not 0 <= self.label_smoothing < 0.5:
            errors.append(f"train.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.beta is not None and self.beta <= 0:
            errors.append(f"train.beta: must be > 0, got {self.beta}")
        if self.reference_batch_size < 0:
            errors.append(f"train.reference_batch_size: must be >= 0 (0: micro_batch_size), got {self.reference_batch_size}")
        elif self.reference_batch_size and not LOSSES[self.loss].needs_reference:
            errors.append(f"train.reference_batch_size: loss {self.loss} runs no reference pass; remove it")
        return errors + self.lora.problems()


@dataclass(frozen=True)
class EvalConfig:
    every: int = _f(0, "oaif run: evaluate the policy every N rounds and after the last round (0: off).")
    live_prompts: int = _f(0, "oaif run: every round that has no full evaluation, a cheap one on N held-out prompts, a different slice each round (eval/live_win_rate with its 95% interval, records in eval/live_NNNNNN.jsonl); with eval.every 0, a full one after the last round. 0: off.")
    prompts: str = _f("heldout", "Held-out prompt set (same formats as `prompts`); never trained on.")
    prompts_column: str = _f("", "The column of eval.prompts holding the prompt (as prompts_column).")
    prompts_split: str = _f("train", "The split of eval.prompts (as prompts_split).")
    max_prompts: int = _f(0, "Use the first N prompts of the set (0: all).")
    policy: str = _f("", "oaif eval: the policy to evaluate: a checkpoint (runs/NAME/checkpoints/round_XXXXXX), an exported model or any HF path. Empty: the latest checkpoint of <output_dir>/<name>.")
    baseline: str = _f("", "The model the policy is compared with. Empty: the run's starting policy (policy.model).")
    temperature: float = _f(0.0, "0: one greedy response per prompt and side; > 0: one sampled response at this temperature.")
    max_new_tokens: int = _f(0, "Response length limit (0: generate.max_new_tokens).")
    bootstrap: int = _f(1000, "Bootstrap resamples for the win rate's 95% confidence interval.")
    train_judge: bool = _f(True, "With eval.annotate set: the training judge grades the same held-out pairs too (eval/train_judge_win_rate, eval/live_train_judge_win_rate), beside the independent judge's win rate; the report's hacking panel and alarms.judge_gap read it. Two calls of the training judge per evaluated prompt.")
    annotate: AnnotateConfig | None = _f(
        None, "The evaluation annotator: the keys of `annotate` (e.g. {backend: rules, constitution: constitutions/correct.yaml}); keys left out are taken from `annotate`. Unset: the training annotator, with a warning: the policy is then graded by the judge it was trained to please.")

    def problems(self) -> list[str]:
        errors = must_not_be_negative("eval.", {"every": self.every, "max_prompts": self.max_prompts,
                                                "temperature": self.temperature, "max_new_tokens": self.max_new_tokens})
        if self.bootstrap < 1:
            errors.append(f"eval.bootstrap: must be >= 1, got {self.bootstrap}")
        if self.annotate is not None:
            errors += self.annotate.problems("eval.annotate")
        return errors


@dataclass(frozen=True)
class RewardModelConfig:
    model: str = _f("", "oaif train-rm: the base model of the reward model (any transformers causal LM: path or hub id), given a one-output sequence-classification head. Empty: policy.model.")
    epochs: int = _f(1, "Passes over the training pairs (Llama 2 and InstructGPT train their reward models 1 epoch: longer over-fits).")
    learning_rate: float = _f(1e-5, "AdamW learning rate (Llama 2: 1e-5; tiny models need far more, e.g. 1e-3).")
    batch_size: int = _f(32, "Pairs per optimizer step (chosen and rejected go through one forward pass).")
    heldout_fraction: float = _f(0.1, "Share of the pairs (seeded by `seed`) kept out of training to measure the reward model's accuracy each epoch; in (0, 1). Pairs are split, not prompts: a prompt may be on both sides.")
    margin_scale: float = _f(0.0, "Loss -log σ(r_chosen - r_rejected - m) with m = scale·(2p-1), p = the annotator's P(chosen better) in the pair record (Llama 2's margin from rater confidence). A row without p_chosen counts as p = 1, as `oaif offline` reads it. 0: off.")
    max_tokens: int = _f(1024, "Sequences (prompt + response, formatted) longer than this are left out of training, counted; never truncated.")
    # Not a LoraConfig: its adapter and sync keys (a starting adapter, weights to vLLM) mean nothing here.
    lora: bool = _f(False, "Train a LoRA adapter (peft; PERL, Sidahmed et al. 2024) and the score head instead of all weights; the adapter is merged into the saved model.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r).")
    lora_target_modules: tuple[str, ...] = _f(LoraConfig().target_modules, "Module names that get adapters (as train.lora.target_modules).")

    def problems(self) -> list[str]:
        errors = must_be_positive("reward_model.",
                  {"epochs": self.epochs, "learning_rate": self.learning_rate, "batch_size": self.batch_size,
                   "max_tokens": self.max_tokens, "lora_r": self.lora_r})
        if not 0 < self.heldout_fraction < 1:
            errors.append(f"reward_model.heldout_fraction: must be in (0, 1), got {self.heldout_fraction}")
        return errors + must_not_be_negative("reward_model.", {"margin_scale": self.margin_scale})


@dataclass(frozen=True)
class SFTConfig:
    epochs: int = _f(3, "oaif sft (supervised warm start; full weights, or a LoRA adapter with train.lora.enabled, merged into the saved model): epochs × ⌈rows / batch_size⌉ optimizer steps, as many rows as that many passes over the data (TRL's default 3).")
    max_steps: int | None = _f(None, "Optimizer steps in all, instead of epochs (TRL's max_steps). Unset: from epochs.")
    learning_rate: float = _f(2e-5, "AdamW learning rate (TRL's SFT default; the tiny policy's build uses 3e-3).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_steps: int = _f(0, "The learning rate rises linearly over these first steps (0: none).")
    min_lr_ratio: float = _f(0.0, "The learning rate decays linearly from learning_rate toward 0 over the steps, never below this share of it.")
    batch_size: int = _f(8, "Rows per optimizer step, drawn at random afresh for each step (distinct within a step, as nanoGPT draws its batches: over an epoch a row may come twice, another not at all); the loss is the mean over the step's response tokens.")
    micro_batch_size: int = _f(8, "Rows per forward/backward pass (gradient accumulation up to batch_size).")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    max_tokens: int = _f(1024, "Rows longer than this (prompt after the chat template + response + EOS) are left out, counted; never truncated.")
    split: str = _f("train", "The split of a dataset with splits (as prompts_split).")

    def problems(self) -> list[str]:
        errors = must_be_positive("sft.",
                  {"epochs": self.epochs, "learning_rate": self.learning_rate, "batch_size": self.batch_size,
                   "micro_batch_size": self.micro_batch_size, "max_tokens": self.max_tokens})
        errors += must_not_be_negative("sft.", {"max_steps": self.max_steps or 0, "weight_decay": self.weight_decay,
                                                "warmup_steps": self.warmup_steps, "max_grad_norm": self.max_grad_norm})
        if not 0 <= self.min_lr_ratio <= 1:
            errors.append(f"sft.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        return errors


@dataclass(frozen=True)
class CritiqueConfig:
    prompts: str = _f("", "oaif critique (Constitutional AI's supervised stage: answer, critique against a principle, revise): the prompt set (formats, column and split as `prompts`). Empty: `prompts`.")
    max_prompts: int = _f(0, "Use the first N prompts of the set (0: all).")
    constitution: str = _f("", "The constitution whose `principles` the critiques apply: one drawn per prompt and step, seeded by `seed` (Constitutional AI samples one critique request per step). Empty: annotate.constitution.")
    revisions: int = _f(1, "Critique-and-revision steps per prompt, each with its own principle; each revises the last revision (Constitutional AI made up to 4).")
    critic: Literal["policy", "vllm", "transformers", "openai"] = _f(
        "policy", "Who writes the critiques: 'policy' (the policy itself, as in Constitutional AI), 'vllm' (critique.critic_model in its own vLLM engine, with annotate.dtype, kv_cache_gib, enforce_eager, gpu_memory_utilization), 'transformers' (critique.critic_model in transformers, always greedy, annotate.dtype and batch_size), 'openai' (model critique.critic_model at annotate.openai's endpoint, with its key, timeouts and retries; annotate.max_prompt_tokens limits its prompts).")
    critic_model: str = _f("", "The critic: a model folder or hub id (vllm, transformers) or the API's model name (openai). Required unless critique.critic is 'policy'. It gets each critique prompt as a user turn of its chat template.")
    max_new_tokens: int = _f(128, "Token limit of each answer, critique and revision.")
    temperature: float = _f(0.0, "Sampling temperature of answers, critiques and revisions (each sample seeded from `seed`); 0: greedy.")
    max_prompt_tokens: int = _f(1024, "A prompt (the user's, or a rendered critique or revision prompt, after the chat template) longer than this ends that prompt's critique early: recorded as `dropped`, left out of sft.jsonl and pairs.jsonl; never truncated.")
    critique_template: str = _f("critique", "The critic's prompt. Placeholders: {principle} {conversation} {response} (all required); the template's <tags> are neutralised in the inserted text.")
    revision_template: str = _f("revision", "The policy's revision prompt. Placeholders: {conversation} {response} {critique} (required), {principle}.")

    def problems(self) -> list[str]:
        errors = must_be_positive("critique.",
                  {"revisions": self.revisions, "max_new_tokens": self.max_new_tokens,
                   "max_prompt_tokens": self.max_prompt_tokens})
        errors += must_not_be_negative("critique.", {"max_prompts": self.max_prompts, "temperature": self.temperature})
        if self.critic != "policy" and not self.critic_model:
            errors.append(f"critique.critic_model: critic '{self.critic}' needs a model: a model folder or hub id "
                          f"(vllm, transformers) or the API's model name (openai); or set critique.critic=policy")
        if self.critic == "policy" and self.critic_model:
            errors.append("critique.critic_model: the 'policy' critic is policy.model; set critique.critic (vllm, "
                          "transformers, openai) to use another model, or remove critique.critic_model")
        return errors


@dataclass(frozen=True)
class AlarmsConfig:
    action: Literal["off", "warn", "stop"] = _f("warn", "What a tripped reward-hacking alarm does (oaif/alarms.py): 'warn' prints a line and records it (alarms.jsonl, alarms/* in metrics.jsonl); 'stop' ends the run: before the round that tripped it is trained on, with the last round's checkpoint (length, markers, canary), or after it, with its checkpoint, naming the one before (kl, judge_gap); 'off' checks nothing.")
    length_ratio: float = _f(2.0, "Trips when a round's mean response length is more than this many times the run's first round's, or less than 1/this of it: a length rule or a length-biased judge being exploited. 0: off.")
    marker_rate: float = _f(0.05, "Trips when more than this share of a round's responses carry judge markers (annotate/injection_rate): the policy is learning to write to its judge. 0: off.")
    canary_drop: float = _f(0.2, "Trips when judge/canary_accuracy falls more than this below the run's first canary check: the judge itself changed. 0: off.")
    kl_max: float = _f(10.0, "Trips when a round's train/kl_to_ref (nats per response, the KL to the start along its sampled responses) exceeds this: the policy moved far from its start (it grows with response length: set it for yours). Read after the round is trained. 0: off.")
    judge_gap: float = _f(0.2, "Trips when the training judge's win rate against the start (eval/train_judge_win_rate, or the live one) exceeds the independent judge's (eval.annotate) by more than this on the same held-out answers: the policy pleases its judge, not the other. Needs eval.annotate and eval.train_judge. 0: off.")

    def problems(self) -> list[str]:
        errors = [f"alarms.{k}: must be >= 0 (0: off), got {v}" for k, v in
                  {"marker_rate": self.marker_rate, "canary_drop": self.canary_drop, "kl_max": self.kl_max,
                   "judge_gap": self.judge_gap}.items() if v < 0]
        if self.length_ratio and self.length_ratio <= 1:
            errors.append(f"alarms.length_ratio: must be > 1 (or 0: off), got {self.length_ratio}")
        return errors


@dataclass(frozen=True)
class RunConfig:
    name: str = _f("tiny", "Run name; the run directory is <output_dir>/<name>. One plain folder name: letters, digits, '.', '-', '_'.")
    output_dir: str = _f("runs", "Parent folder of run directories.")
    overwrite: bool = _f(False, "Replace an existing run directory of the same name (otherwise it is an error). Only a folder that oaif made as a run directory is ever replaced.")
    prompts: str = _f("tiny_prompts", "Prompt set: JSONL, one {'messages': [...]} (or {'prompt': str}) per line, optional 'id' and 'references' (accepted answers, for the matches_reference rule). Or a dataset with such columns: a .parquet or .csv file, a folder written by datasets' save_to_disk, a folder of data files or a hub dataset name (datasets.load_dataset).")
    prompts_column: str = _f("", "The column of the prompt set holding the prompt, a string or chat messages (e.g. question); in a JSONL file, that key of each line. Empty: 'messages' where present, else 'prompt'.")
    prompts_split: str = _f("train", "The split of a prompt set with splits (load_dataset, a save_to_disk DatasetDict; a .parquet or .csv file is one split, 'train'). A JSONL file has none: ignored.")
    rounds: int = _f(8, "Rounds of generate → annotate → train → sync.")
    prompts_per_round: int = _f(16, "Prompts per round (the OAIF batch; the paper uses 128).")
    seed: int = _f(0, "Seeds prompt order, the vLLM engine and torch.")
    threads: int = _f(0, "torch threads for training (0: leave torch's default).")
    async_rounds: int = _f(0, "1: sample round k+1 while the trainer trains on round k (asynchronous RLHF, Noukhovitch et al. 2024): the policy's engine runs in its own process and each round trains on samples one update old (their records say which policy_version drew them). 0: every round samples the policy as it is now (OAIF). One process, in-process engine only (not with server_url or train.lora.sync vllm_lora).")
    async_threads: int = _f(1, "async_rounds: torch threads of the engine's process. On 2 cores, 1 here and threads: 1 for the trainer measured fastest (README benchmarks).")
    async_cpus: str = _f("", "async_rounds: pin the engine's process to these CPUs ('0-7', '0,2'), e.g. half the cores of a large machine, the trainer on the rest. Empty: not pinned (on 2 cores pinning measured slower).")
    check_memory: bool = _f(True, "Before anything loads, estimate the memory the run needs from the policy's shapes (trainer weights, gradients and AdamW, the reference, the engine's weights and KV cache, local judges, the libraries; oaif/memory.py) and refuse, in one line, a run that cannot fit in this machine's available memory (on a GPU: the trainer's parts in what the engines leave). The estimate is recorded as startup/memory_estimate_gib. false: start anyway.")
    verbose: bool = _f(False, "Show the libraries' logs and warnings (vLLM, transformers, torch) on the terminal too; they always go to <run dir>/run.log.")
    report_to: tuple[Literal["tensorboard", "wandb", "trackio"], ...] = _f((), "Experiment trackers for each round's metrics and a sample table, e.g. [tensorboard] (written to <run dir>/tensorboard) or [tensorboard, wandb]. Each needs its package: pip install 'oaif[tensorboard]' (or wandb, trackio).")
    tracking_project: str = _f("oaif", "wandb / trackio: the project the run is logged under (the run is named after `name`).")
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    critique: CritiqueConfig = field(default_factory=CritiqueConfig)
    alarms: AlarmsConfig = field(default_factory=AlarmsConfig)

    def problems(self) -> list[str]:
        """Every problem of the config: the run's own keys, those that span sections, then each section's."""
        errors = must_be_positive("",
                  {"rounds": self.rounds, "prompts_per_round": self.prompts_per_round})
        # The run directory <output_dir>/<name> may be replaced (overwrite): a name that is not one
        # plain folder ('', '.', '..', 'a/b') would point it at a parent or another folder.
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", self.name) or self.name in (".", ".."):
            errors.append(f"name: {self.name!r} is not a plain folder name (letters, digits, '.', '-', '_'; "
                          f"no '/', not empty); the run directory is <output_dir>/<name>")
        if not self.output_dir.strip():
            errors.append("output_dir: must not be empty (e.g. runs)")
        n, a = self.generate.samples_per_prompt, self.annotate
        if a.select.rule != "random" and a.ranking != "consecutive":
            errors.append(f"annotate.select.rule: {a.select.rule!r} chooses the comparisons itself; set "
                          f"annotate.ranking=consecutive (or annotate.select.rule=random to rank by {a.ranking})")
        elif a.budget.calls_per_round + a.budget.calls_total and a.ranking != "consecutive":
            errors.append(f"annotate.budget: a cap on judge calls is spent by annotate.select.rule; set "
                          f"annotate.ranking=consecutive ({a.ranking} needs every comparison it asks for)")
        if a.select.rule != "random":
            if n <= 2:
                errors.append(f"generate.samples_per_prompt: annotate.select.rule {a.select.rule!r} chooses among a "
                              f"prompt's responses; it needs more than 2, got {n} (e.g. 4)")
        elif a.ranking == "consecutive" and (n < 2 or n % 2):
            errors.append(f"generate.samples_per_prompt: must be even and >= 2 with annotate.ranking consecutive "
                          f"(samples are paired 0-1, 2-3, ...), got {n}; more than 2 can be ranked: "
                          f"annotate.ranking=round_robin or knockout")
        elif n < 2:
            errors.append(f"generate.samples_per_prompt: must be >= 2 to compare responses, got {n}")
        lora = self.train.lora
        if self.async_rounds not in (0, 1):
            errors.append(f"async_rounds: 0 (sample, then train) or 1 (sample the next round while training), "
                          f"got {self.async_rounds}")
        elif self.async_rounds and (self.generate.servers() or (lora.enabled and lora.sync == "vllm_lora")):
            errors.append("async_rounds: needs oaif's own engine process; unset generate.server_url(s) and use "
                          "train.lora.sync=merge")
        if self.async_rounds and self.generate.turns > 1:   # the next round's pair would be asked before its conversation grew
            errors.append("generate.turns: conversations of more than 1 turn need async_rounds: 0")
        if self.generate.servers() and lora.sync == "vllm_lora":
            errors.append("train.lora.sync: 'vllm_lora' needs the in-process engine; server mode syncs by merge")
        for section in (self.policy, self.generate, self.train, self.annotate, self.eval, self.reward_model, self.sft,
                        self.critique, self.alarms):
            errors += section.problems()
        return errors


class ConfigError(ValueError):
    pass


# An API key's variable ends in _KEY; one that also holds one of these words names another
# kind of credential (AWS_SECRET_ACCESS_KEY, SSH_PRIVATE_KEY), which no endpoint should get.
NOT_API_KEY_WORDS = ("SECRET", "ACCESS", "PRIVATE", "PASSWORD", "TOKEN", "SSH", "GPG", "SIGNING")


def key_env_problem(name: str, field: str) -> str | None:
    """Why `name` may not be the variable whose value is sent as an API key (None: it may)."""
    if not name:
        return None   # no key sent
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*_KEY", name) or set(name.split("_")) & set(NOT_API_KEY_WORDS):
        return (f"{field}: {name!r} does not look like an API key's variable; name one that ends in _KEY, in "
                f"capitals (e.g. OPENAI_API_KEY), with none of the words {', '.join(NOT_API_KEY_WORDS)} in it")
    return None


def url_problem(url: str, field: str, key_env: str, key_field: str) -> str | None:
    """Why `url` may not be used with the key named by `key_env` (None: it may). Credentials
    in the URL would be saved in config.yaml and shown in logs and reports; a key over plain
    http to another machine crosses the network readable by anyone on the way."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        parts.port   # noqa: B018 (a bad port raises here)
    except ValueError as e:
        return f"{field}: not a URL ({e})"
    if parts.username is not None or parts.password is not None or parts.query:
        return (f"{field}: holds credentials (user:password@ or a ?query); give the URL without them and put the "
                f"key in an environment variable named by {key_field}")
    key = os.environ.get(key_env) if key_env else None
    if key and parts.scheme == "http" and not is_loopback(parts.hostname or ""):
        return (f"{field}: plain http to {parts.hostname} would carry the key in ${key_env} unencrypted; use "
                f"https, or set {key_field} to '' to send no key")
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # a name: it may resolve anywhere


class RunStopped(RuntimeError):
    """A run that stopped itself on purpose, with a message saying why and what to do (e.g.
    training diverged); the CLI prints it in one line, like a ConfigError."""


def _coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Check (and lightly convert) one leaf value against its annotation."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, errors)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path, errors)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            errors.append(f"{path}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple and len(typing.get_args(tp)) == 2 and typing.get_args(tp)[1] is Ellipsis:
        item = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected a list, got {value!r}")
            return ()
        if dataclasses.is_dataclass(item):
            return tuple(_build(item, v, f"{path}[{i}]", errors) for i, v in enumerate(value))
        return tuple(_coerce(v, item, f"{path}[{i}]", errors) for i, v in enumerate(value))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            errors.append(f"{path}: expected a list of {len(args)} items, got {value!r}")
            return value
        return tuple(_coerce(v, a, f"{path}[{i}]", errors) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")


def _build(cls: type, data: Any, path: str, errors: list[str]) -> Any:
    if not isinstance(data, dict):
        errors.append(f"{path or 'config'}: expected a mapping, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{(path + '.' if path else '') + near[0]}'?)" if near else ""
            errors.append(f"{dotted}: unknown key{hint}")
            continue
        kwargs[key] = _coerce(value, hints[key], dotted, errors)
    return cls(**kwargs)


def _merged(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section (lists and values replace)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.beta=0.2' -> (['train', 'beta'], 0.2); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.beta=0.2")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


# Keys naming files or folders: relative to the config file's folder when they are there.
PATH_KEYS = ("prompts", "eval.prompts", "eval.baseline", "eval.policy", "policy.model", "policy.chat_template",
             "train.lora.adapter",
             "annotate.constitution", "annotate.template", "annotate.model", "annotate.canary.pairs",
             "eval.annotate.constitution",
             "eval.annotate.template", "eval.annotate.model", "generate.user_simulator_template",
             "critique.critique_template", "critique.revision_template", "critique.prompts", "reward_model.model")


def _resolve_paths(data: dict, folder: Path) -> None:
    for key in PATH_KEYS:
        *sections, name = key.split(".")
        node = data
        for k in sections:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(name), str):
            node[name] = resolve_against(folder, node[name])
    for member in (data.get("annotate") or {}).get("mix") or []:
        for name in ("constitution", "model"):
            if isinstance(member, dict) and isinstance(member.get(name), str):
                member[name] = resolve_against(folder, member[name])


def load_config(path: str | Path | dict | None = None, overrides: list[str] = ()) -> RunConfig:
    """The typed config from a YAML file (or a dict of the same shape, or None: every
    default), with key=value overrides on top; every problem named at once (ConfigError)."""
    data: dict = {}
    if isinstance(path, dict):
        data, path = copy.deepcopy(path), None
    elif path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if data is None:   # an empty file would silently run every default
            raise ConfigError(f"{path}: the file is empty; start from configs/tiny_cpu.yaml")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        _resolve_paths(data, path.parent)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:   # absent, or an optional section left empty (eval.annotate: null)
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    ev = data.get("eval")
    if isinstance(ev, dict) and isinstance(ev.get("annotate"), dict) and isinstance(data.get("annotate", {}), dict):
        # The evaluation annotator inherits every key it leaves out from the training one, but for
        # the choice and cap of the training judge's comparisons: the evaluation judges every pair.
        training = {k: v for k, v in data.get("annotate", {}).items() if k not in ("select", "budget")}
        data = {**data, "eval": {**ev, "annotate": _merged(training, ev["annotate"])}}
    errors: list[str] = []
    cfg = _build(RunConfig, data, "", errors)
    if not errors:
        errors = cfg.problems()
    if errors:
        where = f" in {path}" if path else ""
        raise ConfigError(f"{len(errors)} problem(s){where}:\n  " + "\n  ".join(errors))
    return cfg


def to_dict(cfg: Any) -> dict:
    out = dataclasses.asdict(cfg)

    def plain(v):  # tuples -> lists so the saved YAML is plain and reloadable
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return list(v) if isinstance(v, tuple) else v

    return plain(out)


def dump_config(cfg: RunConfig, path: Path) -> None:
    """Written whole (temp file + rename): a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field: the README's config reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key + ".")
        elif typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            rows.append((key, "[]", f.metadata["help"]))
            rows += describe(typing.get_args(tp)[0], key + "[].")
        else:
            default = f.default
            rows.append((key, "" if default is None else str(list(default) if isinstance(default, tuple) else default),
                         f.metadata["help"]))
    return rows
