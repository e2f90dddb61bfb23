"""Tier 2, server mode: a real vLLM server process, real DPO steps, weights pushed over the
wire (vLLM's weight-transfer API, oaif's gloo engine) and through the path fallback (a saved
copy the server reloads: pause -> reload_weights -> reset_prefix_cache -> resume). The same
server shows that it answers only oaif's clients, and that it and the weights pushed into
it leave nothing behind. Servers on other nodes: test_weight_transfer.py."""

import tempfile
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from oaif.datasets_io import load_prompts
from oaif.generate import sample_seeds
from oaif.engine.server import (ServerEngine, _tail, push_weights_to_server, server_key, start_server, stop_server,
                                transfer_args)

from conftest import ROOT, MarkedProcesses, oaif_main, train_push_and_compare_greedy, versions_follow_training


def encode(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def group_of(pgid: int) -> set[int]:
    """The live (not zombie) processes of process group `pgid`."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            state, _, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            pids.add(int(entry.name))
    return pids


def pushed_weights() -> set[Path]:
    """The folders of weights pushed to a server (push_weights_to_server's default place)."""
    return set(Path("/dev/shm").glob("oaif-weights-*"))


@pytest.fixture(scope="module")
def server(tiny_model):
    before = pushed_weights()
    # Generous deadline: another vLLM test may be sharing the 2 cores.
    proc = start_server(str(tiny_model), None, "float32", seed=0, max_model_len=512, kv_cache_gib=0.25,
                        extra_args=["--enforce-eager", *transfer_args("wire")], timeout_s=400)
    engine = ServerEngine([f"http://127.0.0.1:{proc.port}"])
    yield f"http://127.0.0.1:{proc.port}", engine, proc
    engine.close()
    assert len(group_of(proc.pid)) >= 2   # the server and its engine core
    stop_server(proc)
    # Ended whole, and after every push of the module's tests (the CLI run's included), nothing
    # of it is left: no process of its group, no log, no weights folder.
    assert group_of(proc.pid) == set() and proc.log.closed and not list(Path(tempfile.gettempdir()).glob(
        f"oaif-vllm-{proc.port}-*"))   # the log was unlinked at the start
    assert pushed_weights() <= before, pushed_weights() - before


def test_server_samples_carry_exact_tokens_and_eos(tiny_model, server):
    from oaif.models import load_causal_lm

    base_url, engine, _ = server
    push_weights_to_server(base_url, load_causal_lm(str(tiny_model), "float32", trainable=False))   # whatever ran before
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = load_prompts(ROOT / "prompts/tiny_prompts.jsonl")[:6]
    ids = [encode(tokenizer, p.messages) for p in prompts]
    seeds = sample_seeds(0, "round 0", len(prompts), 2)
    groups = engine.sample(ids, seeds, temperature=0.9, top_p=1.0, max_tokens=64)
    assert len(groups) == 6 and all(len(g) == 2 for g in groups)
    for token_ids, text, finish_reason in (s for g in groups for s in g):
        assert tokenizer.decode(token_ids, skip_special_tokens=True) == text
        assert finish_reason in ("stop", "length")
        if finish_reason == "stop":
            assert token_ids[-1] == tokenizer.eos_token_id
    assert any(fr == "stop" for g in groups for _, _, fr in g), "the tiny policy should end some answers"
    # Each sample has its own seed: the samples of one prompt differ, and the same seeds repeat them.
    assert sum(g[0][1] != g[1][1] for g in groups) >= 4
    assert engine.sample(ids[::-1], seeds[::-1], temperature=0.9, top_p=1.0, max_tokens=64) == groups[::-1]


@pytest.mark.parametrize("sync", ["wire", "path"])
def test_after_dpo_steps_and_push_server_greedy_equals_transformers(tiny_model, server, sync):
    base_url, engine, _ = server
    push = {"wire": lambda policy: engine.load_weights(policy, 0),
            "path": lambda policy: push_weights_to_server(base_url, policy)}[sync]
    train_push_and_compare_greedy(tiny_model, engine, push)


def mean_token_logprob(model, samples: list[dict]) -> float:
    """Mean log-probability per response token of `samples` under `model`."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s["prompt_token_ids"] + s["token_ids"]])
            logps = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
            total += logps[len(s["prompt_token_ids"]) - 1:].sum().item()
            count += len(s["token_ids"])
    return total / count


def test_loop_in_server_mode_through_the_cli(tiny_model, server, tmp_path):
    """`oaif run` with generate.server_url: the run first pushes its starting policy into the
    server (which holds some other weights: here, noise), samples come from the server
    process, and each round's weights reach it through its reload endpoints."""
    import torch

    from oaif.records import read_jsonl
    from oaif.models import load_causal_lm


    url, engine, _ = server
    base = load_causal_lm(str(tiny_model), "float32", trainable=False)
    noise = load_causal_lm(str(tiny_model), "float32", trainable=False)
    torch.manual_seed(0)
    for p in noise.parameters():
        p.data.add_(torch.randn_like(p), alpha=0.5)
    push_weights_to_server(url, noise)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = load_prompts(ROOT / "prompts/tiny_prompts.jsonl")[:8]
    ids = [encode(tokenizer, p.messages) for p in prompts]
    from_noise = [{"prompt_token_ids": i, "token_ids": t} for i, g in
                  zip(ids, engine.sample(ids, sample_seeds(0, "noise", 8, 2), 0.9, 1.0, 32)) for t, _, _ in g]

    # A server this run did not start: its key comes from the variable the config names.
    key = server_key(url)
    r = oaif_main("run", "configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}",
                 "name=server", "rounds=3", "prompts_per_round=8", f"generate.server_url={url}",
                 "generate.server_api_key_env=OAIF_TEST_SERVER_KEY", env={"OAIF_TEST_SERVER_KEY": key})
    assert r.returncode == 0, r.stderr[-3000:]
    assert key not in r.stdout + r.stderr and not [p for p in tmp_path.rglob("*") if p.is_file()
                                                   and key.encode() in p.read_bytes()]
    metrics = read_jsonl(tmp_path / "server/metrics.jsonl")
    versions = versions_follow_training(metrics, trained_at_least=2)   # each trained round pushed (sync > 0)
    samples = read_jsonl(tmp_path / "server/rounds/000002/samples.jsonl")
    assert len(samples) == 16 and all(s["policy_version"] == versions[1] and s["token_ids"] for s in samples)
    # Round 0 sampled the starting policy, not the noise the server held: its samples are far
    # likelier under the starting policy than samples of the noise are.
    round0 = read_jsonl(tmp_path / "server/rounds/000000/samples.jsonl")
    assert mean_token_logprob(base, round0) > mean_token_logprob(base, from_noise) + 1.0


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp writes them) of sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_the_server_listens_on_loopback_and_answers_only_its_key(server):
    """vLLM's own --api-key leaves every path outside /v1 open (the weight endpoints among
    them): oaif's middleware closes all but /health, and the key stays off the command line
    and out of the log."""
    import httpx

    url, engine, proc = server
    key = server_key(url)
    assert len(key) >= 40 and listening_addresses(proc.port) == {"0100007F"}   # 127.0.0.1, nothing else
    paths = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
             ("POST", "/tokenize"), ("POST", "/invocations"), ("GET", "/metrics"), ("GET", "/server_info"),
             ("POST", "/pause"), ("POST", "/resume"), ("POST", "/collective_rpc"), ("POST", "/reset_prefix_cache"),
             ("POST", "/sleep"), ("POST", "/init_weight_transfer_engine"), ("POST", "/start_weight_update"),
             ("POST", "/update_weights"), ("POST", "/finish_weight_update")]
    for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": key}):
        for method, path in paths:
            r = httpx.request(method, url + path, headers=headers, json={"method": "reload_weights"})
            assert r.status_code == 401, (path, headers, r.status_code, r.text[:200])
    assert httpx.get(url + "/health").status_code == 200
    tokens = httpx.post(url + "/tokenize", headers={"Authorization": f"Bearer {key}"},
                        json={"model": engine.servers[0].model, "prompt": "Hi"})
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    assert key.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    log = _tail(proc, 10 ** 6)
    assert len(log) > 1000 and key not in log   # the whole log so far, read through its handle


def test_a_server_ends_with_the_process_that_started_it(tiny_model):
    """SIGKILL of oaif runs no `finally`: the server (own session, so stop_server can end its
    group) must still end, through its parent-death signal, with every process it started."""
    import signal
    import subprocess
    import sys

    marked = MarkedProcesses("OAIF_SERVER_TEST")
    code = (f"from oaif.engine.server import start_server\n"
            f"p = start_server({str(tiny_model)!r}, None, 'float32', 0, 256, 0.25, ['--enforce-eager'], timeout_s=400)\n"
            f"print(p.pid, flush=True)\nimport time; time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=marked.env)
    try:
        server_pid = int(parent.stdout.readline())       # the server is up and answering
        assert server_pid in marked.pids()
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert marked.gone_within(60), marked.pids()
    finally:   # a failed check above must not leave the server up for the parent's 10 minutes
        marked.kill()
        parent.wait()


def test_a_server_started_without_the_weight_transfer_setting_is_named_with_the_fix():
    """What /server_info says of a server started without --weight-transfer-config."""
    from oaif.config import RunStopped
    from oaif.engine.server import open_transfer

    plain = {"weight_transfer_config": None, "parallel_config": {"world_size": 1, "data_parallel_size": 1}}
    with pytest.raises(RunStopped) as e:
        open_transfer("http://127.0.0.1:8000", plain, client=None)
    assert str(e.value) == ("http://127.0.0.1:8000: the server was started without --weight-transfer-config "
                            "'{\"backend\": \"gloo\"}' (got None); restart it so (docs/guides/multi-node.md), or set "
                            "generate.server_weight_sync=path, the fallback through a shared folder")
