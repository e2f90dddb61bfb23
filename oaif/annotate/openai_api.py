"""The `openai` backend: a judge behind any OpenAI-compatible API (OpenAI, a vLLM server, ...).

logprob mode asks for one token and reads P(first better) from the two label tokens'
log-probs among the top candidates (RLAIF §2.1). With `endpoint: completions` the prompt is
the exact text the local backends score, so a vLLM server of the same model gives the same
probability. text mode lets the judge write an answer and reads the label from its fixed
final line only (base.parse_text_answer).

Requests run concurrently (at most `max_concurrency` in flight), each with a deadline and
our own retries with exponential backoff; a request that still fails becomes an invalid
Answer that says why, never an exception, so one bad request cannot sink a batch. The API
key is read from the environment at call time (a vLLM server this process started: that
server's own key) and kept out of every Answer: blanked in a server's text before any cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os

import httpx
import openai

from oaif.annotate.base import (Answer, Identity, JudgeRequest, JudgeTemplate, parse_text_answer, rationale_prompt,
                                render_body, render_judge_prompt, text_answer_instruction, two_label_probability)
from oaif.config import AnnotateConfig, ConfigError, OpenAIConfig, key_env_problem, url_problem
from oaif.constitution import Constitution
from oaif.engine.server import server_key

NO_KEY = "EMPTY"  # local servers need no key, but the client insists on one (never sent: see _judge)
# Statuses worth retrying: request timeout, rate limit, and every 5xx. Other 4xx would fail again.
RETRY_STATUS = {408, 429}
# What reading a response that arrived but is unusable raises: JSON without the fields read
# here (no choices, no log-probs), or values of the wrong type.
MALFORMED = (ValueError, AttributeError, IndexError, KeyError, TypeError)


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (the rare HTTP-date form is ignored: backoff applies)."""
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def short(text: str, secret: str | None, limit: int = 200) -> str:
    """One line of at most `limit` characters, the secret (the API key) blanked first: a key
    across the cut would otherwise leave its start in the text."""
    text = str(text).replace(secret, "<api key>") if secret else str(text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def check_endpoint(api: OpenAIConfig, where: str) -> None:
    """A ConfigError unless the key variable looks like an API key's and the URL may carry it
    (no credentials in it; no key over plain http to another machine). where: the section."""
    problems = [p for p in (key_env_problem(api.api_key_env, f"{where}.openai.api_key_env"),
                            url_problem(api.base_url, f"{where}.openai.base_url", api.api_key_env,
                                        f"{where}.openai.api_key_env")) if p]
    if problems:
        raise ConfigError("; ".join(problems))


def logsumexp(xs: list[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


class OpenAIAnnotator:
    backend = "openai"

    def __init__(self, cfg: AnnotateConfig, model: str, constitution: Constitution, template: JudgeTemplate):
        self.cfg, self.api = cfg, cfg.openai
        self.model, self.constitution, self.template = model, constitution, template
        check_endpoint(self.api, "annotate")   # config validation checks it too, but not a config built in code
        self.labels: tuple[str, str] = tuple(cfg.labels)
        self.secret: str | None = None   # the key of the batch in progress, blanked in every text kept
        self.stats = {"requests_sent": 0, "retries": 0, "failures": 0, "prompt_tokens": 0, "completion_tokens": 0,
                      "api_tokens": 0}   # billed: both kinds, as the replies' usage counts them
        if self.api.price_per_mtok_input or self.api.price_per_mtok_output:
            self.stats["api_cost"] = 0.0   # money, at annotate.openai's prices
        # label -> token id; None until looked up, {} when the server cannot tell (match by text).
        self.label_ids: dict[str, int] | None = None

    @property
    def identity(self) -> Identity:
        c = self.constitution
        return Identity("openai", self.model, c.name, c.hash, self.template.hash)

    def use_constitution(self, constitution: Constitution, template: JudgeTemplate) -> None:
        self.constitution, self.template = constitution, template

    def judge(self, requests: list[JudgeRequest]) -> list[Answer]:
        return asyncio.run(self._judge(requests)) if requests else []

    def complete(self, prompts: list[str], max_tokens: int, temperature: float) -> list[tuple[str | None, str | None]]:
        """Free text from the same endpoint, for a stage that needs a writer, not a judge (the
        critic of `oaif critique`): per prompt (text, None), or (None, why it failed), with the
        same concurrency, deadline and retries as judging."""
        return asyncio.run(self._complete(prompts, max_tokens, temperature)) if prompts else []

    async def _complete(self, prompts: list[str], max_tokens: int, temperature: float):
        async with self._client() as (client, key):
            sem = asyncio.Semaphore(self.api.max_concurrency)
            replies = await asyncio.gather(*(self._call(client, sem, p, self._read_text, max_tokens=max_tokens,
                                                        temperature=temperature) for p in prompts))
        # As in _judge: the key must not reach a record.
        return [(text, why.replace(key, "<api key>") if why and key != NO_KEY else why) for text, why in replies]

    @contextlib.asynccontextmanager
    async def _client(self):
        """(client, key) for one batch of requests."""
        key = server_key(self.api.base_url) or os.environ.get(self.api.api_key_env) or NO_KEY
        self.secret = key if key != NO_KEY else None
        # No key: no Authorization header at all (the client insists on a key; the request omits it).
        self.auth = {} if key != NO_KEY else {"extra_headers": {"Authorization": openai.Omit()}}
        # The client's own retries are off: ours (_call) are the only ones, and are counted.
        async with openai.AsyncOpenAI(base_url=self.api.base_url, api_key=key, max_retries=0,
                                      timeout=self.api.timeout_s) as client:
            yield client, key

    async def _judge(self, requests: list[JudgeRequest]) -> list[Answer]:
        async with self._client() as (client, key):
            if self.api.mode == "logprob" and self.label_ids is None:
                self.label_ids = await self._find_label_ids(key)
            sem = asyncio.Semaphore(self.api.max_concurrency)
            answers = await asyncio.gather(*(self._one(client, sem, r) for r in requests))
        # A server may echo request headers in an error body; the key must not reach a record.
        return [Answer(a.p_first, a.raw.replace(key, "<api key>"), a.label_mass) for a in answers] if key != NO_KEY else answers

    async def _find_label_ids(self, key: str) -> dict[str, int] | None:
        """Each label's token id from the server's /tokenize (vLLM serves it at the root, not
        under /v1). Known ids let us ask for candidates as "token_id:N" (vLLM's
        return_tokens_as_token_ids): with byte-level tokenizers two candidates can decode to
        the same text and the text-keyed answer keeps only one of them. A server without
        /tokenize (OpenAI, which also rejects unknown request fields) gets {}: plain requests,
        labels matched by text. None: the server could not be reached, so ask again next call."""
        root = self.api.base_url.rstrip("/").removesuffix("/v1")
        # The label as it follows the answer prefix (completions) or opens the reply (chat).
        prefix = self.template.answer_prefix if self.api.endpoint == "completions" else ""
        try:
            async with httpx.AsyncClient(timeout=self.api.timeout_s,
                                         headers={"Authorization": f"Bearer {key}"} if key != NO_KEY else {}) as http:
                async def tokens(text: str) -> list[int]:
                    r = await http.post(f"{root}/tokenize",
                                        json={"model": self.model, "prompt": text, "add_special_tokens": False})
                    r.raise_for_status()
                    return [int(t) for t in r.json()["tokens"]]
                base = await tokens(prefix)
                full = {label: await tokens(prefix + label) for label in self.labels}
        except (httpx.TransportError, httpx.HTTPStatusError) as e:
            transient = isinstance(e, httpx.TransportError) or e.response.status_code >= 500
            return None if transient else {}
        except MALFORMED:  # a /tokenize that is not vLLM's
            return {}
        ids = {}
        for label, t in full.items():
            if t[:len(base)] != base or len(t) != len(base) + 1:
                raise ValueError(f"annotate.labels: {label!r} is not one token after the judge prompt for "
                                 f"{self.model}; pick labels that are (e.g. '1'/'2' or 'A'/'B')")
            ids[label] = t[-1]
        return ids

    def text_prompt(self, r: JudgeRequest) -> str:
        """text mode's prompt: the judge prompt's body, then how to write the final answer line."""
        t = self.template
        return f"{render_body(t, self.constitution, r, self.labels)}\n{text_answer_instruction(t, self.labels)}\n"

    def request_body(self, prompt: str) -> dict:
        """What a request sends the judge: the prompt as the user message (chat) or as is
        (completions). Its inserted text was neutralised for every common chat format, as the
        server's tokenizer is not known here."""
        if self.api.endpoint == "chat":
            return {"messages": [{"role": "user", "content": prompt}]}
        return {"prompt": prompt}

    async def _one(self, client: openai.AsyncOpenAI, sem: asyncio.Semaphore, r: JudgeRequest) -> Answer:
        t, c = self.template, self.constitution
        if self.api.mode == "text":  # the written answer is its own rationale: chain_of_thought adds nothing
            text, err = await self._call(client, sem, self.text_prompt(r), self._read_text,
                                         max_tokens=self.api.max_tokens, temperature=self.api.temperature)
            return Answer(None, err) if err else Answer(parse_text_answer(text, t, self.labels), text)
        rationale = None
        if self.cfg.chain_of_thought:
            rationale, err = await self._call(client, sem, rationale_prompt(t, c, r, self.labels), self._read_text,
                                              max_tokens=self.cfg.rationale_tokens, temperature=0.0)
            if err:
                return Answer(None, f"rationale: {err}")
        k = self.api.top_logprobs
        logprobs = {"logprobs": True, "top_logprobs": k} if self.api.endpoint == "chat" else {"logprobs": k}
        extra = {"extra_body": {"return_tokens_as_token_ids": True}} if self.label_ids else {}
        got, err = await self._call(client, sem, render_judge_prompt(t, c, r, self.labels, rationale=rationale),
                                    self._read_top, max_tokens=1, temperature=0.0, **logprobs, **extra)
        answer = Answer(None, err) if err else self._label_answer(*got)
        return answer if rationale is None else Answer(answer.p_first, f"rationale={rationale!r} {answer.raw}",
                                                       answer.label_mass)

    async def _call(self, client: openai.AsyncOpenAI, sem: asyncio.Semaphore, prompt: str, read, **params):
        """One completion with our retries: (what `read` takes from it, None) or (None, why it failed)."""
        api = self.api
        create = client.chat.completions.create if api.endpoint == "chat" else client.completions.create
        body = self.request_body(prompt)
        for attempt in range(api.max_retries + 1):
            if attempt:
                self.stats["retries"] += 1
                await asyncio.sleep(pause)
            pause = api.backoff_s * 2 ** attempt  # before the next attempt, unless the server says otherwise
            try:
                async with sem:
                    self.stats["requests_sent"] += 1
                    # A total deadline: the client's timeout bounds each read, not the whole request.
                    resp = await asyncio.wait_for(create(model=self.model, **body, **params, **self.auth), api.timeout_s)
            except openai.APIStatusError as e:
                why = f"HTTP {e.status_code}: {short(e.message, self.secret)}"
                if e.status_code not in RETRY_STATUS and e.status_code < 500:
                    break
                told = retry_after(e.response)
                pause = pause if told is None else told   # Retry-After: 0 means now
                continue
            except (TimeoutError, openai.APITimeoutError):
                why = f"timeout after {api.timeout_s:g}s"
                continue
            except openai.APIConnectionError as e:
                why = f"connection error: {short(e, self.secret)}"
                continue
            except (openai.APIResponseValidationError, ValueError) as e:  # ValueError: a body that is not JSON
                why = f"malformed response body ({type(e).__name__}: {short(e, self.secret)})"
                continue
            try:
                value = read(resp)
            except MALFORMED as e:
                why = f"malformed response body ({type(e).__name__}: {short(e, self.secret)})"
                continue
            usage = getattr(resp, "usage", None)
            if usage is not None:
                tokens_in, tokens_out = usage.prompt_tokens or 0, usage.completion_tokens or 0
                self.stats["prompt_tokens"] += tokens_in
                self.stats["completion_tokens"] += tokens_out
                self.stats["api_tokens"] += tokens_in + tokens_out
                if "api_cost" in self.stats:
                    self.stats["api_cost"] += (tokens_in * api.price_per_mtok_input
                                               + tokens_out * api.price_per_mtok_output) / 1e6
                # Same rule as the local backends, known only once the server has counted.
                if tokens_in > self.cfg.max_prompt_tokens:
                    return None, f"judge prompt has {usage.prompt_tokens} tokens > annotate.max_prompt_tokens"
            return value, None
        self.stats["failures"] += 1
        return None, f"request failed after {attempt + 1} attempt(s): {why}"

    def _read_text(self, resp) -> str:
        choice = resp.choices[0]
        # A chat reply without content (e.g. a refusal) is an answer with no label in it.
        text = (choice.message.content or "") if self.api.endpoint == "chat" else choice.text
        if not isinstance(text, str):
            raise TypeError(f"completion text is {type(text).__name__}")
        return text

    def _read_top(self, resp) -> tuple[str, dict[str, float]]:
        """The sampled token's text and the top candidates' log-probs at the answer position."""
        choice = resp.choices[0]
        if self.api.endpoint == "chat":
            top = {t.token: t.logprob for t in choice.logprobs.content[0].top_logprobs}
        else:
            top = choice.logprobs.top_logprobs[0]
        top = {str(tok): float(lp) for tok, lp in top.items()}
        if not top:
            raise ValueError("no top log-probs in the response")
        return self._read_text(resp), top

    def _is_label(self, token: str, label: str) -> bool:
        if token.startswith("token_id:"):
            return bool(self.label_ids) and token == f"token_id:{self.label_ids[label]}"
        return token.strip() == label

    def _label_answer(self, next_token: str, top: dict[str, float]) -> Answer:
        floor = min(top.values())
        logps, notes = [], [f"next={next_token!r}"]
        for label in self.labels:
            # Matched by text, " 1" and "1" are the same answer: their probabilities add up.
            hits = [lp for tok, lp in top.items() if self._is_label(tok, label) and math.isfinite(lp)]
            logps.append(logsumexp(hits) if hits else None)
            notes.append(f"logp[{label}]={logps[-1]:.4f}" if hits else
                         f"logp[{label}]<={floor:.4f} (not in the top {len(top)}; bounded by the smallest)")
        if logps[0] is None and logps[1] is None:
            return Answer(None, f"next={next_token!r} neither label is among the top {len(top)} candidates")
        l1, l2 = (floor if lp is None else lp for lp in logps)
        # The mass seen among the top candidates (a label outside them adds nothing).
        mass = sum(math.exp(lp) for lp in logps if lp is not None)
        return Answer(two_label_probability(l1, l2), " ".join(notes), mass)
