"""Multi-process training on an existing engine: `accelerate launch` (DDP, FSDP, DeepSpeed).

    accelerate launch --config_file configs/accelerate/gpu_ddp.yaml -m oaif.cli run CONFIG
    accelerate launch --config_file configs/accelerate/cpu_ddp_2proc.yaml -m oaif.cli run CONFIG  (CPUs, gloo)

Rank 0 (the main process) samples, judges and writes every record; all ranks train on
their share of each round's pairs (train.py); rank 0 pushes the gathered weights to the
generator. An in-process vLLM engine cannot live beside torch.distributed (it would join
the trainers' process group), so under a launcher the policy is served by a vLLM server
process: the one at generate.server_url, or one rank 0 starts and stops itself.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable, TypeVar

from oaif.config import ConfigError, RunConfig

T = TypeVar("T")

# Rank 0 may spend a long round sampling and judging while the others wait in a collective:
# the default process-group timeout (30 min) would kill them.
WAIT_TIMEOUT = timedelta(hours=6)


def launched() -> bool:
    """True under a multi-process launcher (accelerate launch, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator():
    """An Accelerator when launched with several processes, else None (the plain path)."""
    if not launched():
        return None
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # Without a GPU, accelerate only forms a (gloo) process group when told it runs on CPUs;
    # DeepSpeed's launch type survives only cpu=False, with gloo named (else: no process group).
    cpu = not torch.cuda.is_available()
    if cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo", timeout=WAIT_TIMEOUT)])
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=WAIT_TIMEOUT)])
    if cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        use_fsdp_on_cpus(accelerator)
    return accelerator


def use_fsdp_on_cpus(accelerator) -> None:
    """Make an FSDP launch on CPUs shard. accelerate (1.16) picks FSDP only on an accelerator
    device type: on CPUs it silently picks MULTI_CPU, i.e. DDP (cpu=True), or no process group
    at all (cpu=False). Its FSDP2 code (prepare, no_sync, clip_grad_norm_, get_state_dict) runs
    on CPUs over gloo as it is, so the launch's type is set to the one a GPU launch gets: the
    CPU run then goes through the same code as a GPU run. FSDP1 wants a device id: refused."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()   # from the launcher's FSDP_* variables
    if plugin.fsdp_version != 2:
        raise ConfigError(f"FSDP on CPUs: set fsdp_version: 2 in the accelerate config (it is {plugin.fsdp_version}); "
                          f"see configs/accelerate/cpu_fsdp_2proc.yaml")
    # Both shared states: AcceleratorState copies the distributed type from PartialState's
    # whenever it is built again (prepare does).
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def check_distributed(cfg: RunConfig, accelerator, judge: bool = True) -> None:
    """Settings that cannot work across processes, named before anything starts (judge:
    whether this command runs the annotator)."""
    if accelerator is None:
        return
    from accelerate.utils import DistributedType

    errors = []
    a = cfg.annotate
    backends = [m.backend for m in a.mix] if a.backend == "mix" else [a.backend]
    if judge and "vllm" in backends:
        errors.append("annotate.backend: the 'vllm' judge is an in-process engine, which cannot run beside "
                      "torch.distributed; serve the judge model with vLLM's OpenAI server and use backend 'openai'")
    if judge and a.select.rule != "random":
        errors.append(f"annotate.select.rule: {a.select.rule!r} reads the policy on the judging process alone, "
                      f"which a sharded policy cannot do; run in one process, or use rule random")
    if cfg.async_rounds:
        errors.append("async_rounds: runs in one process; launch without accelerate, or set async_rounds=0")
    if cfg.eval.every or cfg.eval.live_prompts:
        key = "every" if cfg.eval.every else "live_prompts"
        errors.append(f"eval.{key}: in-loop evaluation runs in one process; evaluate a multi-process run's "
                      "checkpoints with `oaif eval` instead")
    if cfg.train.lora.enabled and cfg.train.lora.sync == "vllm_lora":
        errors.append("train.lora.sync: 'vllm_lora' needs the in-process engine; multi-process runs sync by merge")
    replicated = accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if cfg.train.lora.enabled and not replicated:
        errors.append(f"train.lora.enabled: LoRA runs under DDP only (this launch is {accelerator.distributed_type.value})")
    if cfg.train.compile:   # compiled graphs around DDP's buckets or FSDP's gathers are not tested here
        errors.append("train.compile: compiles the single-process trainer only; set train.compile=false for a "
                      "multi-process launch")
    if cfg.train.check_replicas and not replicated:
        errors.append(f"train.check_replicas: only DDP keeps whole replicas (this launch is "
                      f"{accelerator.distributed_type.value})")
    world, t = accelerator.num_processes, cfg.train
    if accelerator.distributed_type == DistributedType.DEEPSPEED and t.micro_batch_size * world < t.batch_size:
        # DeepSpeed's engine steps the optimizer inside every backward that syncs, so each
        # rank gets one pass per optimizer step.
        errors.append(f"train.micro_batch_size: under DeepSpeed each rank runs one pass per optimizer step; "
                      f"set it to at least batch_size / processes = {-(-t.batch_size // world)}")
    if errors:
        raise ConfigError(f"{len(errors)} problem(s) for a multi-process run:\n  " + "\n  ".join(errors))


def end(accelerator) -> None:
    """Leave the process group before exit (else gloo can abort at interpreter exit)."""
    if accelerator is not None:
        accelerator.end_training()


def on_main(accelerator, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result (or its error) to every rank, so a failure
    on rank 0 stops all ranks with the same message instead of leaving them waiting."""
    if accelerator is None:
        return fn()
    import torch.distributed as dist

    box: list = [None]
    if accelerator.is_main_process:
        try:
            box[0] = (fn(), None)
        except Exception as e:  # noqa: BLE001 (re-raised on every rank below)
            box[0] = (None, e)
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def sharded(accelerator) -> bool:
    """FSDP or DeepSpeed: each rank holds only a shard of the weights and optimizer state."""
    if accelerator is None:
        return False
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def fsdp(accelerator) -> bool:
    if accelerator is None:
        return False
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def gathered_state_dict(accelerator, model):
    """The full state dict for saving or syncing, or None on the plain path. Every rank must
    call it: FSDP and ZeRO-3 gather the shards collectively."""
    return None if accelerator is None else accelerator.get_state_dict(model)


def gathered_optimizer_state(accelerator, model, optimizer) -> dict | None:
    """FSDP: the whole optimizer state, keyed by parameter name, on rank 0 (a collective: every
    rank must call it; the others get {}). None elsewhere: a replicated optimizer's own
    state_dict is already whole."""
    if not fsdp(accelerator):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer.optimizer,   # under accelerate's wrapper
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Every rank takes its own shard of a whole FSDP optimizer state (gathered_optimizer_state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer.optimizer, state, options=StateDictOptions(full_state_dict=True))


def stop_agreed(stop: bool, accelerator) -> bool:
    """Whether any rank wants to stop (a signal, a callback): every rank must stop after the
    same round, checkpoint included (a collective), or the others would wait for it forever."""
    if accelerator is None or accelerator.num_processes == 1:
        return stop
    import torch

    flag = torch.tensor([1.0 if stop else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
