"""Weights over the wire, the parts both ends share (torch only: nothing here loads vLLM,
which takes seconds to import; engine/transfer.py holds the classes vLLM loads).

A trainer pushes its policy into vLLM servers on any node through vLLM's own weight-transfer
API (vllm.distributed.weight_transfer), so a server never reads the trainer's files. The
control plane is the server's RL routes (/init_weight_transfer_engine, /start_weight_update,
/update_weights, /finish_weight_update; development mode); the data plane is a process group
of the trainer (rank 0) and the server's workers (ranks 1..N), opened once per server:
  nccl  vLLM's own engine, on GPUs;
  gloo  oaif's engine, over torch.distributed's gloo backend on TCP, for CPUs. vLLM finds it
        through the `vllm.general_plugins` entry point of the oaif package (`register`), in
        every process of a server that a user starts on any node where oaif is installed:

    VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model DIR \\
        --weight-transfer-config '{"backend": "gloo"}' ...

A whole state dict moves in a few large broadcasts (tensors packed into byte chunks), not one
call per tensor.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import ClassVar

import torch

BACKEND = "gloo"
CHUNK_BYTES = 256 << 20   # one broadcast per chunk: few round trips, and a bounded receive buffer


def register() -> None:
    """The `vllm.general_plugins` entry point, also called by the trainer before a transfer:
    adds the gloo engines to vLLM's two factories by module path (vLLM imports them when a
    transfer is made). vLLM may call it more than once in a process."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, name in ((WeightTransferEngineFactory, "GlooWeightTransferEngine"),
                          (WeightTransferTrainerFactory, "GlooTrainerWeightTransferEngine")):
        if BACKEND not in factory._registry:
            factory.register_engine(BACKEND, "oaif.engine.transfer", name)


def local_address(peer_host: str) -> str:
    """The address of this host that `peer_host` reaches it by: the source address the kernel
    routes toward the peer (a UDP connect sends nothing). 127.0.0.1 for a local peer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(peer_host), 9))
        return s.getsockname()[0]


def gloo_group(master_address: str, master_port: int, rank: int, world_size: int,
               timeout_s: float) -> torch.distributed.ProcessGroupGloo:
    """A gloo group of its own (never the default process group, which a launched trainer and
    a server's tensor-parallel workers already use), rendezvous through a TCPStore that rank 0
    serves. Each rank's device binds the address its peers reach it by."""
    timeout = timedelta(seconds=timeout_s)
    store = torch.distributed.TCPStore(master_address, master_port, world_size, is_master=rank == 0,
                                       timeout=timeout, wait_for_workers=False)
    options = torch.distributed.ProcessGroupGloo._Options()
    options._timeout = timeout
    host = master_address if rank == 0 else local_address(master_address)
    options._devices = [torch.distributed.ProcessGroupGloo.create_device(hostname=host)]
    return torch.distributed.ProcessGroupGloo(store, rank, world_size, options)


def broadcast(group: torch.distributed.ProcessGroupGloo, buffer: torch.Tensor) -> None:
    """rank 0's buffer into every rank's (a uint8 chunk)."""
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([buffer], opts).wait()


def chunk_buffer(buffers: list[torch.Tensor], k: int, size: int) -> torch.Tensor:
    """Chunk k's byte buffer, kept from the last sync when it has the size: a fresh 100 MB
    allocation costs more than sending it (the first touch of every page)."""
    if k == len(buffers):
        buffers.append(torch.empty(0, dtype=torch.uint8))
    if buffers[k].numel() != size:
        buffers[k] = torch.empty(size, dtype=torch.uint8)
    return buffers[k]


def nbytes(shape, dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def chunks(sizes: list[int], chunk_bytes: int) -> list[list[int]]:
    """Tensor indices grouped into consecutive chunks of at most chunk_bytes (a tensor larger
    than that is a chunk alone). Both ends compute it from the same metadata."""
    out, size = [[]], 0
    for i, n in enumerate(sizes):
        if out[-1] and size + n > chunk_bytes:
            out.append([])
            size = 0
        out[-1].append(i)
        size += n
    return [c for c in out if c]


@dataclass
class GlooTrainerInit:
    """The trainer's init info for vLLM's trainer factory (which dispatches on `backend`)."""
    backend: ClassVar[str] = BACKEND
    master_address: str
    master_port: int
    world_size: int
    rank: int = 0
    timeout_s: float = 300.0
    chunk_bytes: int = CHUNK_BYTES

    @property
    def is_sender(self) -> bool:
        return self.rank == 0


class NamedWeights:
    """A WeightSource for vLLM's trainer engines: the (name, tensor) pairs of the sync at hand
    (set before each send), on the device the transfer needs."""

    def __init__(self, device: str):
        self.device, self.weights = device, []

    def metadata(self) -> list:
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self.weights]

    def __iter__(self):
        return ((name, t.to(self.device)) for name, t in self.weights)
