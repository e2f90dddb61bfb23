"""Tier 2: the policy's vLLM engine in its own process (oaif.engine.process), real vLLM in real
processes. Compared with transformers, never with an in-process vllm.LLM: ending one tears
down vLLM's process-wide state under any other engine in this pytest process."""

import copy
import multiprocessing
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from oaif.engine.process import EngineProcessError, ProcessEngine
from oaif.datasets_io import load_prompts
from oaif.generate import sample_seeds
from oaif.engine.weights import hf_named_weights

from conftest import ROOT, hf_greedy

CPU = min(os.sched_getaffinity(0))   # the module's engine is pinned to one CPU this process may use


def build_kwargs(model) -> dict:
    return dict(model=str(model), dtype="float32", seed=0, kv_cache_gib=0.25, max_model_len=256, enforce_eager=True)


@pytest.fixture(scope="module")
def engine(tiny_model):
    engine = ProcessEngine(build_kwargs(tiny_model), threads=1, cpu_bind=str(CPU))
    yield engine
    engine.close()
    assert engine.process.exitcode == 0, "close() should stop the child cleanly, not terminate it"
    assert not process_exists(engine.process.pid)


@pytest.fixture(scope="module")
def policy(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def perturbed(policy):
    """The policy with noise on every weight: another model whose greedy outputs differ."""
    model = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return model


@pytest.fixture(scope="module")
def prompt_ids(tiny_model) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
             for p in load_prompts(ROOT / "prompts/tiny_prompts.jsonl")[:6]]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def transformers_greedy(model, prompt_ids, max_new_tokens=24) -> list[list[int]]:
    return [hf_greedy(model, ids, max_new_tokens, model.config.eos_token_id) for ids in prompt_ids]


def load(engine, model) -> None:
    """The module's engine may hold another test's weights: start from known ones."""
    engine.push(hf_named_weights(model))
    engine.wait_loaded()


def process_exists(pid: int) -> bool:
    """False once the process is gone or a zombie (its parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Call(threading.Thread):
    """fn(*args) in a thread, so that a test can see whether it returns (and not hang if not)."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.error = fn, args, None
        self.start()

    def run(self):
        try:
            self.fn(*self.args)
        except BaseException as e:
            self.error = e

    def returned_within(self, seconds: float) -> bool:
        self.join(seconds)
        return not self.is_alive()


def test_greedy_equals_transformers_and_seeds_repeat(engine, policy, prompt_ids, tiny_model):
    load(engine, policy)
    assert engine.greedy(prompt_ids, 24) == transformers_greedy(policy, prompt_ids)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    seeds = sample_seeds(0, "round 0", len(prompt_ids), 2)
    groups = engine.sample(prompt_ids, seeds, temperature=0.9, top_p=1.0, max_tokens=32)
    assert [len(g) for g in groups] == [2] * len(prompt_ids)
    for token_ids, text, finish_reason in (c for g in groups for c in g):
        assert tokenizer.decode(token_ids, skip_special_tokens=True) == text
        assert finish_reason in ("stop", "length")
    assert engine.sample(prompt_ids, seeds, 0.9, 1.0, 32) == groups, "the same seeds must give the same samples"
    other = engine.sample(prompt_ids, sample_seeds(0, "round 1", len(prompt_ids), 2), 0.9, 1.0, 32)
    assert sum(a[0] != b[0] for ga, gb in zip(groups, other) for a, b in zip(ga, gb)) >= 4
    assert sum(g[0][0] != g[1][0] for g in groups) >= 3, "each sample has its own seed"


def test_pushed_weights_are_what_the_engine_samples_from(engine, policy, perturbed, prompt_ids):
    # One prompt longer than a KV block (128 tokens on the CPU): its first block is cached
    # under the old weights, and must not be reused under the new ones.
    prompt_ids = [*prompt_ids, (sum(prompt_ids, []) * 2)[:130]]
    load(engine, policy)
    before = engine.greedy(prompt_ids, 24)
    # Pushes in a row, none waited for: each waits for the previous load; the last one wins.
    for model in (perturbed, policy, perturbed):
        engine.push(hf_named_weights(model))
    engine.wait_loaded()
    after = engine.greedy(prompt_ids, 24)
    assert after == transformers_greedy(perturbed, prompt_ids)
    assert after != before, "the noise should change some greedy output (else the check is vacuous)"

    with pytest.raises(ValueError, match="names or shapes"):
        engine.push(hf_named_weights(policy)[1:])


def test_submit_and_push_return_at_once_and_a_queued_sample_keeps_the_old_weights(engine, policy, perturbed,
                                                                                   prompt_ids):
    load(engine, policy)
    seeds = sample_seeds(0, "round 0", len(prompt_ids), 2)
    expected = engine.sample(prompt_ids, seeds, 0.9, 1.0, 32)   # from `policy`

    # With the child stopped, nothing can be sampled: submit and push must return anyway
    # (the push overwrites the shared buffers before the child even starts the sample).
    os.kill(engine.process.pid, signal.SIGSTOP)
    try:
        submit = Call(engine.submit, prompt_ids, seeds, 0.9, 1.0, 32)
        assert submit.returned_within(30) and submit.error is None
        push = Call(engine.push, hf_named_weights(perturbed))
        assert push.returned_within(30) and push.error is None
        # Another push (other weights) must wait until the child has loaded this one, which it
        # reads from the shared buffers: while the child is stopped, the buffers keep this
        # push's weights, whatever time passes.
        second_push = Call(engine.push, hf_named_weights(policy))
        assert not second_push.returned_within(2)
        assert all(torch.equal(buffer, tensor) for (_, buffer), (_, tensor)
                   in zip(engine._buffers, hf_named_weights(perturbed))), "the waiting push overwrote the buffers"
    finally:
        os.kill(engine.process.pid, signal.SIGCONT)
    assert second_push.returned_within(60) and second_push.error is None
    assert engine.collect() == expected, "the sample was queued before the push: it must see the old weights"
    engine.wait_loaded()
    assert engine.greedy(prompt_ids, 24) == transformers_greedy(policy, prompt_ids), "the last push wins"


def test_child_pinned_to_the_given_cpus(engine):
    threads = os.listdir(f"/proc/{engine.process.pid}/task")
    assert len(threads) > 1
    assert all(os.sched_getaffinity(int(t)) == {CPU} for t in threads)


def test_request_error_comes_back_with_the_childs_traceback(engine, policy, prompt_ids):
    load(engine, policy)
    too_long = [[5] * 300]   # longer than max_model_len
    with pytest.raises(EngineProcessError, match=r"(?s)greedy decoding failed.*Traceback.*maximum context length"):
        engine.greedy(too_long, 8)
    assert engine.greedy(prompt_ids[:2], 8) == transformers_greedy(policy, prompt_ids[:2], 8), "still serves"


def test_bad_model_path_names_it_and_leaves_no_process(tmp_path):
    missing = str(tmp_path / "no-such-model")
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(EngineProcessError, match=r"(?s)no-such-model.*Traceback") as caught:
        ProcessEngine(build_kwargs(missing))
    assert str(caught.value).count("no-such-model") >= 2, "the child's exception text should name it too"
    assert [p for p in multiprocessing.active_children() if p.pid not in before] == []


def test_a_failed_load_or_a_dead_child_fails_every_call_after_it(tiny_model, prompt_ids):
    """One engine for both (a start costs seconds), so the load fails first: a load that
    fails leaves the engine's weights undefined, so it refuses to sample from them; a child
    killed while a call waits on it fails that call, and every later one, at once."""
    engine = ProcessEngine(build_kwargs(tiny_model))
    try:
        weights = hf_named_weights(AutoModelForCausalLM.from_pretrained(tiny_model))
        misnamed = [("model.no_such_layer.weight", weights[0][1]), *weights[1:]]
        engine.push(misnamed)
        with pytest.raises(EngineProcessError, match=r"(?s)loading pushed weights failed.*Traceback"):
            engine.wait_loaded()
        with pytest.raises(EngineProcessError, match="earlier weight load failed"):
            engine.greedy(prompt_ids[:1], 4)

        os.kill(engine.process.pid, signal.SIGSTOP)   # so that the sample cannot be answered
        engine.submit(prompt_ids, sample_seeds(0, "round 0", len(prompt_ids), 2), 0.9, 1.0, 32)
        os.kill(engine.process.pid, signal.SIGKILL)
        waiting = Call(engine.collect)
        assert waiting.returned_within(60), "collect() must notice the dead child, not wait forever"
        assert isinstance(waiting.error, EngineProcessError) and "is gone" in str(waiting.error)
        with pytest.raises(EngineProcessError, match="is gone"):
            engine.greedy(prompt_ids[:1], 4)
        with pytest.raises(EngineProcessError, match="is gone"):
            engine.push(misnamed)
    finally:
        engine.close()
    assert not process_exists(engine.process.pid)


PARENT = """
import ast, sys, time
from oaif.engine.process import ProcessEngine
engine = ProcessEngine(ast.literal_eval(sys.argv[1]))
print("engine pid", engine.process.pid, flush=True)
time.sleep(600)
"""

# Runs PARENT, kills it, and reports how its orphaned engine process ended: as a subreaper,
# this process inherits the orphan, so it can wait for it and read its end.
WATCHER = """
import ctypes, os, subprocess, sys
PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
parent = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
child = int(next(line for line in parent.stdout if line.startswith("engine pid ")).split()[-1])
parent.kill()
parent.wait()
_, status = os.waitpid(child, 0)
print(f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}")
"""


def test_child_dies_with_its_parent(tiny_model):
    """A parent killed by SIGKILL runs no cleanup. An idle child would stop on its own (its
    pipe reads end-of-file), a busy one would run on: what ends it must be the parent-death
    signal, SIGTERM, whatever the child is doing."""
    watcher = subprocess.run([sys.executable, "-c", WATCHER, PARENT, repr(build_kwargs(tiny_model))], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert watcher.stdout.splitlines()[-1:] == [f"signal {signal.SIGTERM.value}"], watcher.stderr[-2000:]


def test_an_engine_that_samples_in_the_callers_thread_holds_one_submitted_request():
    """engine/base.Submitted: submit answers at once and collect hands that answer over, once;
    a second submit before collect, or a collect without a submit, is a caller's mistake."""
    from oaif.engine.base import Submitted

    class Echo(Submitted):
        def sample(self, prompt_token_ids, seeds, temperature, top_p, max_tokens):
            return [[(ids, f"seed {s}", "stop") for s in row] for ids, row in zip(prompt_token_ids, seeds)]

    engine = Echo()
    engine.submit([[1, 2]], [[7, 8]], 1.0, 1.0, 4)
    with pytest.raises(RuntimeError, match="still outstanding"):
        engine.submit([[3]], [[9]], 1.0, 1.0, 4)
    assert engine.collect() == [[([1, 2], "seed 7", "stop"), ([1, 2], "seed 8", "stop")]]
    with pytest.raises(RuntimeError, match="without a submitted sample"):
        engine.collect()
