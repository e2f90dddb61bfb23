"""The policy's vLLM engine in a process of its own, so that sampling and training overlap.

In one process they cannot: the GIL and the shared CPU thread pool serialise the engine's
steps with the trainer's, so the next round's samples would wait for this round's DPO step.
`ProcessEngine` builds the engine (engine/vllm.py's build_llm, run by its InProcessEngine) in a
spawned child and offers the PolicyEngine calls (engine/base.py): `submit` returns at once, so
the caller trains while the child samples, and `load_weights` (`push`) queues new weights.

What crosses the process boundary, over one pipe, answered strictly in order:
  parent -> child   ("sample" | "greedy", arguments), ("load", buffers or None), ("stop", ())
  child -> parent   one reply to the build, then one per request: (True, result) or
                    (False, the child's traceback text)
  shared memory     the weights. The first push allocates one shared tensor per weight here
                    and hands them to the child once (torch.multiprocessing sends a handle,
                    not the data); every push copies into them and sends ("load", None).
                    No weight is pickled or written to disk.
Prompts, seeds, and the sampled token ids and texts are pickled: they are small.

    engine = ProcessEngine(dict(model="models/tiny", dtype="float32", seed=0, kv_cache_gib=1,
                                max_model_len=512))
    engine.submit(prompt_ids, seeds, 0.9, 1.0, 64)   # returns at once
    ...                                            # train meanwhile
    engine.load_weights(policy, 1)                 # loaded after the queued sample
    completions = engine.collect()                 # drawn from the old weights
    engine.close()
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import traceback

import torch
import torch.multiprocessing

from oaif.collector import owned_process
from oaif.config import ConfigError
from oaif.faults import crash_point
from oaif.engine.base import Completion
from oaif.engine.server import LAUNCHER_VARS, end_with_parent
from oaif.engine.vllm import InProcessEngine, build_llm, shutdown_llm
from oaif.engine.weights import hf_named_weights

POLL_S = 0.5   # how often a waiting caller checks that the child still lives
STOP_S = 10.0  # how long close() lets a running request finish before it terminates the child


class EngineProcessError(RuntimeError):
    """The engine's process failed a request (the message holds its traceback) or died."""


class ProcessEngine:
    """A vLLM engine in a spawned child: the PolicyEngine calls, with asynchronous sampling and
    weight pushes through shared memory. Used from one thread; one submitted sample at a time."""

    def __init__(self, build_kwargs: dict, threads: int | None = None, cpu_bind: str | None = None,
                 wait: bool = True):
        """Start the child and (wait) wait until its engine is built. `build_kwargs` are
        oaif.engine.vllm.build_llm's; `threads` sets the child's torch threads; `cpu_bind` ("0-1",
        "1,3") pins the child to those CPUs. wait=False returns at once, so the caller can
        build other things meanwhile; wait_built() then waits."""
        self.model = build_kwargs["model"]
        context = torch.multiprocessing.get_context("spawn")   # vLLM does not survive a fork
        self._conn, child_conn = context.Pipe()
        # daemon: a caller that never closes the engine still ends it when this process exits.
        self.process = context.Process(target=_serve, name="oaif-engine", daemon=True,
                                       args=(child_conn, build_kwargs, threads, cpu_bind, os.getpid()))
        self.process.start()
        child_conn.close()   # only the child holds its end now: its exit reads as end-of-file here
        # A thread takes the replies off the pipe as they come. Otherwise the child could block
        # on a large reply while this process trains, then this process on a large request to
        # the blocked child: each would wait for the other forever.
        self._replies: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=_read_replies, args=(self._conn, self._replies), daemon=True)
        self._reader.start()
        self._sent, self._received = 1, 0   # request 1 is the build, which the child answers unasked
        self._held: dict[int, tuple[bool, object]] = {}   # replies read before their caller asked
        self._sample_ticket: int | None = None
        self._load_ticket: int | None = None
        self._buffers: list[tuple[str, torch.Tensor]] | None = None
        self._built = False
        if wait:
            self.wait_built()

    def wait_built(self) -> None:
        """Block until the child's engine is built (at once if it is); a failed build closes
        the child and raises with its traceback."""
        if self._built:
            return
        try:
            self._claim(1, f"building the vLLM engine for model {self.model!r}")
        except (EngineProcessError, ConfigError):
            self.close()
            raise
        self._built = True

    def submit(self, prompt_token_ids: list[list[int]], seeds: list[list[int]], temperature: float,
               top_p: float, max_tokens: int) -> None:
        """Queue sample()'s request and return at once; collect() gives its completions."""
        if self._sample_ticket is not None:
            raise RuntimeError("a submitted sample is still outstanding: call collect() first")
        self._sample_ticket = self._request("sample", prompt_token_ids, seeds, temperature, top_p, max_tokens)

    def collect(self) -> list[list[Completion]]:
        """The completions of the submitted sample (blocks until they are ready)."""
        if self._sample_ticket is None:
            raise RuntimeError("collect() without a submitted sample")
        ticket, self._sample_ticket = self._sample_ticket, None
        return self._claim(ticket, "sampling")

    def sample(self, prompt_token_ids, seeds, temperature, top_p, max_tokens) -> list[list[Completion]]:
        self.submit(prompt_token_ids, seeds, temperature, top_p, max_tokens)
        return self.collect()

    def greedy(self, prompt_token_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        return self._claim(self._request("greedy", prompt_token_ids, max_tokens), "greedy decoding")

    def load_weights(self, policy: torch.nn.Module, version: int, state_dict: dict | None = None) -> None:
        self.push(hf_named_weights(policy))

    @torch.no_grad()
    def push(self, named_weights: list[tuple[str, torch.Tensor]]) -> None:
        """Make the engine sample from these weights (oaif.engine.weights.hf_named_weights' names and
        tensors). Returns once they are copied into shared memory and the load is queued; the
        child loads them after the requests queued before. wait_loaded() waits for the load."""
        self.wait_loaded()   # the child reads the buffers until it acknowledges the last load
        if self._buffers is None:
            self._buffers = [(name, torch.empty(t.shape, dtype=t.dtype).share_memory_()) for name, t in named_weights]
            shared = self._buffers   # sent once; later loads name no tensors
        else:
            if [(n, t.shape) for n, t in named_weights] != [(n, b.shape) for n, b in self._buffers]:
                raise ValueError("push: the weights' names or shapes differ from the first push's")
            shared = None
        for (_, buffer), (_, tensor) in zip(self._buffers, named_weights):
            buffer.copy_(tensor)
        crash_point("sync_push")
        self._load_ticket = self._request("load", shared)

    def wait_loaded(self) -> None:
        """Block until the last push is loaded (at once if it is, or if nothing was pushed)."""
        if self._load_ticket is not None:
            ticket, self._load_ticket = self._load_ticket, None
            self._claim(ticket, "loading pushed weights")

    def close(self) -> None:
        """Stop the child: asked first, then terminated, then killed. Safe to call twice."""
        if self.process.is_alive():
            try:
                self._conn.send(("stop", ()))
            except OSError:
                pass   # it is already going
            self.process.join(STOP_S)
        for end in (self.process.terminate, self.process.kill):
            if self.process.is_alive():
                end()
                self.process.join(5.0)
        self._reader.join(5.0)
        self._conn.close()

    def _request(self, kind: str, *args) -> int:
        self.wait_built()   # a failed build is reported as that, with its traceback
        if not self.process.is_alive():
            raise self._died(kind)
        try:
            self._conn.send((kind, args))
        except OSError as e:
            raise self._died(kind) from e
        self._sent += 1
        return self._sent

    def _claim(self, ticket: int, what: str):
        """The reply to request `ticket`, holding the earlier replies read on the way."""
        while ticket not in self._held:
            try:
                reply = self._replies.get(timeout=POLL_S)
            except queue.Empty:
                if not self.process.is_alive():
                    raise self._died(what) from None
                continue
            self._received += 1
            self._held[self._received] = reply
        ok, value = self._held.pop(ticket)
        if not ok and isinstance(value, ConfigError):
            raise value
        if not ok:
            raise EngineProcessError(f"{what} failed in the engine process (pid {self.process.pid}):\n{value}")
        return value

    def _died(self, what: str) -> EngineProcessError:
        self.process.join(0)   # reaps it, so exitcode is set
        return EngineProcessError(f"the engine process for {self.model!r} (pid {self.process.pid}) is gone "
                                  f"(exit code {self.process.exitcode}); {what} did not complete")


def _read_replies(conn, replies: queue.Queue) -> None:
    """Parent thread: the child's replies into `replies`, until the child closes its end."""
    try:
        while True:
            replies.put(conn.recv())
    except (EOFError, OSError):
        return


def _cpu_ids(spec: str) -> set[int]:
    """'0-2,5' -> {0, 1, 2, 5} (the syntax of vLLM's VLLM_CPU_OMP_THREADS_BIND)."""
    ids = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        ids.update(range(int(first), int(last or first) + 1))
    return ids


def _serve(conn, build_kwargs: dict, threads: int | None, cpu_bind: str | None, parent_pid: int) -> None:
    """The child: build the engine, then answer requests in order until "stop"."""
    with owned_process():
        _serve_requests(conn, build_kwargs, threads, cpu_bind, parent_pid)


def _serve_requests(conn, build_kwargs: dict, threads: int | None, cpu_bind: str | None, parent_pid: int) -> None:
    end_with_parent()   # SIGTERM when the parent dies, even by SIGKILL
    if os.getppid() != parent_pid:
        return   # the parent died before the signal was armed
    # The parent's Process object is daemonic (the parent's exit ends this process); the copy of
    # the flag here would forbid children, and a tensor-parallel engine starts a worker process
    # per shard (they end with this process).
    multiprocessing.current_process().daemon = False
    try:
        # vLLM reads VLLM_CPU_OMP_THREADS_BIND only in its multiprocessing executor, which this
        # in-process engine uses only for tensor parallel (build_llm then splits this process's
        # cores between the workers): the process pins itself. Every thread that exists now is
        # pinned (imports start a few); the engine's compute threads, started later, inherit it.
        if cpu_bind is not None:
            for thread_id in os.listdir("/proc/self/task"):
                os.sched_setaffinity(int(thread_id), _cpu_ids(cpu_bind))
        if threads is not None:
            torch.set_num_threads(threads)   # before the build: vLLM's CPU worker then disables it
        # Weights load as tensors only into an engine core in this process (not a vLLM engine subprocess).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # Started from a rank of a torchrun / accelerate launch, the engine must not wait for
        # the launcher's other ranks: it is a world of its own.
        for key in LAUNCHER_VARS:
            os.environ.pop(key, None)
        llm = build_llm(**build_kwargs)
        # Every reload warns that the rotary embedding "failed to load" (a computed buffer, not a
        # real failure: see oaif.engine.weights). Quieted here, after the build: vLLM's logging setup resets
        # the levels of its loggers.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
    except ConfigError as e:   # a setting this machine cannot meet: the caller reports it in one line
        conn.send((False, e))
        return
    except Exception:
        conn.send((False, traceback.format_exc()))
        return
    conn.send((True, None))
    engine = InProcessEngine(llm)
    calls = {"sample": engine.sample, "greedy": engine.greedy}
    weights, failed_load = None, None
    while True:
        try:
            kind, args = conn.recv()
        except EOFError:
            break   # the parent closed the pipe without a "stop"
        if kind == "stop":
            break
        try:
            if failed_load is not None:
                raise RuntimeError(f"an earlier weight load failed, so the engine's weights are undefined:\n"
                                   f"{failed_load}")
            if kind == "load":
                (shared,) = args
                if shared is not None:   # the first push hands over the buffers
                    weights = shared
                try:
                    # Copies out of the shared buffers into the engine's own tensors, so the
                    # parent may overwrite them once this load is acknowledged.
                    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
                    llm.reset_prefix_cache()   # its KV blocks were computed with the old weights
                except Exception:
                    failed_load = traceback.format_exc()
                    raise
                value = None
            else:
                value = calls[kind](*args)
        except Exception:
            conn.send((False, traceback.format_exc()))
        else:
            conn.send((True, value))
    shutdown_llm(llm)
