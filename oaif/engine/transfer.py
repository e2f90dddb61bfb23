"""The gloo weight-transfer engines vLLM loads (engine/wire.py says how a transfer goes and
registers these): the server's end in each vLLM worker, the trainer's end as vLLM's trainer
factory builds it. Imported by vLLM only, never at oaif's start (vLLM takes seconds to load)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch
from vllm.distributed.weight_transfer.base import (TrainerWeightTransferEngine, WeightTransferEngine,
                                                   WeightTransferInitInfo, WeightTransferUpdateInfo)

from oaif.faults import crash_point
from oaif.engine.wire import CHUNK_BYTES, GlooTrainerInit, broadcast, chunk_buffer, chunks, gloo_group, nbytes


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """What a server's worker needs to join the group (its rank: rank_offset + its worker rank)."""
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 300.0
    chunk_bytes: int = CHUNK_BYTES


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """One update: every tensor's name, dtype and shape, in the order they are sent."""
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """The server's end, in each vLLM worker: receives the chunks rank 0 broadcasts and loads
    them through the model's own `load_weights` inside vLLM's layerwise reload (the path of
    its reload_weights), so checkpoint names and fused layers are handled as vLLM does."""
    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group, self.chunk_bytes = None, CHUNK_BYTES
        # One per chunk, kept between syncs; within one, vLLM's layerwise reload may hold a
        # chunk's tensors until their layer is complete, so no chunk reuses another's buffer.
        self.buffers: list[torch.Tensor] = []

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        p = self.parallel_config
        rank = init_info.rank_offset + p.data_parallel_index * p.world_size + p.rank
        self.chunk_bytes = init_info.chunk_bytes
        self.group = gloo_group(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                                init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        # The base class ends with torch.accelerator.synchronize(): nothing to wait for on a CPU.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer: call init_weight_transfer_engine first")
        dtypes = [getattr(torch, d) for d in update_info.dtype_names]
        sizes = [nbytes(s, d) for s, d in zip(update_info.shapes, dtypes)]
        for k, chunk in enumerate(chunks(sizes, self.chunk_bytes)):
            buffer = chunk_buffer(self.buffers, k, sum(sizes[i] for i in chunk))
            broadcast(self.group, buffer)
            offsets = [0]
            for i in chunk:
                offsets.append(offsets[-1] + sizes[i])
            self.model.load_weights([(update_info.names[i], buffer[a:b].view(dtypes[i]).view(update_info.shapes[i]))
                                     for i, a, b in zip(chunk, offsets, offsets[1:])])

    def shutdown(self) -> None:
        self.group = None


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInit]):
    """The trainer's end: rank 0 of the group, driving the server through `client`."""
    init_info_cls = GlooTrainerInit

    def __init__(self, *, client, source, group, chunk_bytes: int):
        super().__init__(client=client, source=source, is_sender=True)
        self.group, self.chunk_bytes, self.buffers = group, chunk_bytes, []

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInit, *, client, source=None):
        if not init_info.is_sender or source is None:
            raise ValueError("gloo weight transfer: rank 0 of the trainer sends, from a weight source")
        worker = GlooInitInfo(init_info.master_address, init_info.master_port, 1, init_info.world_size,
                              init_info.timeout_s, init_info.chunk_bytes)
        # The workers wait inside init_weight_transfer_engine for the rendezvous this end serves.
        with ThreadPoolExecutor(1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, asdict(worker))
            group = gloo_group(init_info.master_address, init_info.master_port, 0, init_info.world_size,
                               init_info.timeout_s)
            joined.result()
        return cls(client=client, source=source, group=group, chunk_bytes=init_info.chunk_bytes)

    def send_weights(self) -> None:
        named = list(self.source)
        info = GlooUpdateInfo([n for n, _ in named], [str(t.dtype).removeprefix("torch.") for _, t in named],
                              [list(t.shape) for _, t in named])
        flat = [t.detach().contiguous().view(-1).view(torch.uint8) for _, t in named]
        self.client.start_weight_update()
        # The workers receive inside update_weights: the request and the broadcasts run together.
        with ThreadPoolExecutor(1) as pool:
            received = pool.submit(self.client.update_weights, asdict(info))
            for k, chunk in enumerate(chunks([f.numel() for f in flat], self.chunk_bytes)):
                buffer = chunk_buffer(self.buffers, k, sum(flat[i].numel() for i in chunk))
                broadcast(self.group, torch.cat([flat[i] for i in chunk], out=buffer))
                crash_point("sync_push")
            received.result()
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.group = None
