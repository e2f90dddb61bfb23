"""Weights over the wire to vLLM servers that share no files with the trainer (issue: beyond
one machine). Two servers are started the way docs/guides/multi-node.md tells a user to start
one on another node: the plain `python -m vllm.entrypoints.openai.api_server` command with
`--weight-transfer-config '{"backend": "gloo"}'` (oaif's engine, found by vLLM through the
oaif package's plugin entry point), from their own folders, each in a mount namespace of its
own where /dev/shm and the trainer's folder are empty tmpfs mounts: whatever reaches them came
over TCP on 127.0.0.1. Checked: after real DPO steps each server samples exactly what the
trainer's policy samples greedily; a 2-process `accelerate launch` trainer pushes to both; a
server killed mid-run stops the run with a checkpoint that resumes once it is back, or (asked
for) is dropped and counted while the run goes on."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from oaif.engine.server import ServerEngine, free_port
from oaif.records import read_jsonl

from conftest import ROOT, hf_greedy, oaif_main, read_until, round_row, run_oaif, train_push_and_compare_greedy

KEY_VAR = "OAIF_TEST_NODE_KEY"
KEY = "node-key-for-the-weight-transfer-tests"


def isolated() -> bool:
    """Whether this machine lets a process have a mount namespace of its own (root, Linux)."""
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0 if shutil.which("unshare") \
        else False


class Node:
    """A vLLM server as a user starts it on another node: its own folder (model copy, cwd,
    TMPDIR, HOME), its own key, and where the machine allows it, no view of /dev/shm or of
    `hidden` (the trainer's folder)."""

    def __init__(self, root: Path, model: Path, hidden: Path):
        self.root, self.hidden, self.port = root, hidden, free_port()
        self.model = root / "model"
        if not self.model.exists():
            shutil.copytree(model, self.model)
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        serve = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
                 "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--seed", "0",
                 "--max-model-len", "512", "--kv-cache-memory-bytes", str(1 << 28), "--enforce-eager",
                 "--no-enable-chunked-prefill", "--generation-config", "vllm",
                 "--middleware", "oaif.engine.server.RequireKey",
                 "--weight-transfer-config", '{"backend": "gloo"}']
        if isolated():
            hide = f"mount -t tmpfs none /dev/shm && mount -t tmpfs none {self.hidden} && exec \"$@\""
            serve = ["unshare", "-m", "sh", "-c", hide, "sh", *serve]
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_API_KEY": KEY, "TMPDIR": str(self.root),
               "HOME": str(self.root)}
        self.log = open(self.root / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(serve, cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait(self, timeout_s: float = 400) -> None:
        """Until healthy. A server that lost its port to another process between free_port()
        and its bind (tests run in parallel) starts again on a new one, at most twice."""
        deadline, moves = time.monotonic() + timeout_s, 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.root / f"server-{self.port}.log").read_text()
                assert "address already in use" in log.lower() and moves < 2, log[-3000:]
                self.kill()
                self.port, moves = free_port(), moves + 1
                self.start()
                continue
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"server {self.url} not healthy after {timeout_s} s")

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.log.close()
            self.proc = None


@pytest.fixture(scope="module")
def nodes(tiny_model, tmp_path_factory):
    trainer = tmp_path_factory.mktemp("trainer")
    two = [Node(tmp_path_factory.mktemp(f"node{i}"), tiny_model, trainer) for i in (1, 2)]
    try:
        for node in two:
            node.start()
        for node in two:
            node.wait()
        yield trainer, two
    finally:
        for node in two:
            node.kill()


def shm() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()}


def test_two_servers_that_share_no_files_with_the_trainer_sample_the_synced_policy_exactly(tiny_model, nodes,
                                                                                            monkeypatch):
    from transformers import AutoTokenizer

    from oaif.datasets_io import load_prompts
    from oaif.models import load_causal_lm

    trainer_dir, two = nodes
    monkeypatch.setenv(KEY_VAR, KEY)
    monkeypatch.chdir(trainer_dir)
    before = shm()
    engine = ServerEngine([n.url for n in two], key_env=KEY_VAR)
    trained = []
    try:
        # Three rounds of DPO steps, each pushed to both servers; the two servers' greedy
        # answers together (prompts split across them) equal the trained policy's.
        train_push_and_compare_greedy(tiny_model, engine,
                                      lambda policy: (engine.load_weights(policy, 0), trained.append(policy)))
    finally:
        engine.close()
    # Nothing was saved for the servers to read. Isolated, the servers see an empty /dev/shm of
    # their own, so the exact answers below prove it; the host's /dev/shm is then not compared,
    # since the other test worker's engines write there meanwhile.
    assert isolated() or shm() == before
    # Each server alone holds the trained weights.
    policy, tokenizer = trained[-1], AutoTokenizer.from_pretrained(tiny_model)
    texts = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
             for p in load_prompts(ROOT / "prompts/tiny_prompts.jsonl")[:4]]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    expected = [hf_greedy(policy, i, 32, tokenizer.eos_token_id) for i in ids]
    starting = load_causal_lm(str(tiny_model), "float32", trainable=False)
    assert expected != [hf_greedy(starting, i, 32, tokenizer.eos_token_id) for i in ids]   # training changed them
    for node in two:
        one = ServerEngine([node.url], key_env=KEY_VAR)
        try:
            assert one.greedy(ids, 32) == expected, node.url
        finally:
            one.close()


def test_a_two_process_trainer_pushes_to_both_servers(tiny_model, nodes, tmp_path):
    """`accelerate launch` (2 processes, gloo): rank 0 samples from both servers and pushes the
    gathered weights to both; every round after a trained one samples the new version."""
    _, two = nodes
    urls = "[" + ",".join(n.url for n in two) + "]"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_ddp_2proc.yaml"), "-m", "oaif.cli", "run", "configs/tiny_cpu.yaml",
           f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=two", "rounds=3", "prompts_per_round=8",
           "train.batch_size=4", "train.micro_batch_size=1", f"generate.server_urls={urls}",
           f"generate.server_api_key_env={KEY_VAR}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, KEY_VAR: KEY})
    assert r.returncode == 0, r.stderr[-4000:]
    metrics = read_jsonl(tmp_path / "two/metrics.jsonl")
    assert [m["generate/servers"] for m in metrics] == [2, 2, 2] and all(m["sync/seconds"] > 0 for m in metrics[:2])
    versions = [s["policy_version"] for k in range(3) for s in read_jsonl(tmp_path / f"two/rounds/{k:06d}/samples.jsonl")]
    assert versions == [0] * 16 + [1] * 16 + [2] * 16


def run_until_round(args: list[str], k: int, env: dict) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "oaif.cli", "run", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
    seen = []
    assert read_until(proc, seen, round_row(k)), "".join(seen)[-3000:]
    return proc, seen


def common(tiny_model, tmp_path, two, name: str, *extra: str) -> list[str]:
    return ["configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}", f"name={name}",
            "rounds=30", "prompts_per_round=4", "generate.max_new_tokens=32",
            "generate.server_urls=[" + ",".join(n.url for n in two) + "]", f"generate.server_api_key_env={KEY_VAR}",
            *extra]


def test_a_server_killed_mid_run_is_dropped_and_counted_when_asked(tiny_model, nodes, tmp_path):
    _, two = nodes
    proc, seen = run_until_round(common(tiny_model, tmp_path, two, "drop", "generate.server_drop_dead=true"), 1,
                                 {KEY_VAR: KEY})
    try:
        two[1].kill()
        assert read_until(proc, seen, round_row(4)), "".join(seen)[-3000:]
        proc.send_signal(signal.SIGTERM)   # enough: stop after the round in flight
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        two[1].start()
    assert proc.returncode == 0, err[-3000:]
    assert f"the vLLM server at {two[1].url} stopped answering" in err and "dropped, going on with 1 server" in err
    servers = [m["generate/servers"] for m in read_jsonl(tmp_path / "drop/metrics.jsonl")]
    assert servers[:2] == [2, 2] and servers[-1] == 1 and servers == sorted(servers, reverse=True)
    two[1].wait()


def test_a_server_killed_mid_run_stops_it_with_a_checkpoint_and_resume_goes_on(tiny_model, nodes, tmp_path):
    _, two = nodes
    proc, seen = run_until_round(common(tiny_model, tmp_path, two, "stop"), 1, {KEY_VAR: KEY})
    try:
        two[0].kill()
        out, err = proc.communicate(timeout=300)   # no hang: the run ends by itself
    finally:
        proc.kill()
        two[0].start()
    assert proc.returncode == 2, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("oaif: error:")]
    assert len(line) == 1 and f"the vLLM server at {two[0].url} stopped answering" in line[0], err[-3000:]
    assert "checkpoint after round" in line[0].lower() and f"oaif resume {tmp_path / 'stop'}" in line[0]
    run = tmp_path / "stop"
    last = read_jsonl(run / "metrics.jsonl")[-1]["round"]
    assert (run / "checkpoints" / f"round_{last:06d}").is_dir()
    two[0].wait()
    r = oaif_main("resume", str(run), f"rounds={last + 3}", env={KEY_VAR: KEY})
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["round"] for m in read_jsonl(run / "metrics.jsonl")] == list(range(last + 3))


def test_a_trainer_killed_halfway_through_a_transfer_leaves_a_server_the_resumed_run_can_use(tiny_model, nodes,
                                                                                              tmp_path):
    """SIGKILL after the first chunk of a sync (OAIF_CRASH_AT): the server is left paused with
    its update open; the resumed run ends that update, sends every weight again and goes on."""
    _, two = nodes
    args = ["configs/tiny_cpu.yaml", f"policy.model={tiny_model}", f"output_dir={tmp_path}", "name=killed",
            "rounds=4", "prompts_per_round=4", "generate.max_new_tokens=32", f"generate.server_url={two[0].url}",
            f"generate.server_api_key_env={KEY_VAR}"]
    r = run_oaif("run", *args, env={**os.environ, KEY_VAR: KEY, "OAIF_CRASH_AT": "sync_push:2"})   # 2nd: after training
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    r = oaif_main("resume", str(tmp_path / "killed"), env={KEY_VAR: KEY})
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["round"] for m in read_jsonl(tmp_path / "killed/metrics.jsonl")] == [0, 1, 2, 3]


def test_a_tensor_parallel_server_gets_the_weights_in_every_shard(tiny_model):
    """The server rank 0 starts under a launcher, with generate.tensor_parallel_size=2 on this
    CPU: both of its workers join the transfer (the group has 3 ranks), and after a sync of
    noised weights its greedy output equals transformers' (a shard left with the old weights
    would change it)."""
    import torch

    from oaif.config import load_config
    from oaif.engine.server import start_local_server
    from oaif.models import load_causal_lm

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("tensor parallel 2 needs 2 cores")
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", [f"policy.model={tiny_model}", "generate.tensor_parallel_size=2",
                                                       "generate.kv_cache_gib=0.25", "generate.enforce_eager=true"])
    policy = load_causal_lm(str(tiny_model), "float32", trainable=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    ids = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11], [12, 13, 14], [20, 21, 22, 23]]
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model).eos_token_id
    expected = [hf_greedy(policy, i, 16, eos) for i in ids]
    engine = start_local_server(cfg)
    try:
        before = engine.greedy(ids, 16)
        engine.load_weights(policy, 1)
        assert engine.greedy(ids, 16) == expected != before
    finally:
        engine.close()
