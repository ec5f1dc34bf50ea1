"""The trainer's process group: joining it (torchrun's WORLD_SIZE > 1), wrapping the module for
DDP or FSDP2, and reducing metrics over the ranks. One process without torchrun is rank 0 of 1
and every function here is then a no-op."""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    distributed: bool
    rank: int
    world: int
    device: torch.device


def _destroy_group():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def join() -> Ranks:
    """Joins the process group torchrun describes (nccl on CUDA, gloo on CPU) unless one is
    already up; the device is this rank's GPU, else the CPU."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # the group made here is torn down before the interpreter's own teardown: left to it,
        # gloo's threads were destroyed still joinable ("terminate called without an active
        # exception": a finished 2-rank run aborted with SIGABRT in a CI run on the AVX2 EPYC)
        atexit.register(_destroy_group)
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
              if torch.cuda.is_available() else torch.device("cpu"))
    return Ranks(distributed=distributed,
                 rank=dist.get_rank() if dist.is_initialized() else 0,
                 world=dist.get_world_size() if dist.is_initialized() else 1, device=device)


def wrap(module, model, fsdp: bool, ranks: Ranks):
    """module for the step: as is in one process; FSDP2 (each decoder layer, then the whole)
    with fsdp; DDP otherwise."""
    if not ranks.distributed:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        body = model.get_decoder()
        for layer in getattr(body, "layers", []):
            fully_shard(layer)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(module, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None)


def sum_over_ranks(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """t summed over the ranks, in place (t itself in one process)."""
    if ranks.distributed:
        dist.all_reduce(t)
    return t


def mean_metrics(metrics: dict, ranks: Ranks) -> dict:
    """{name: scalar tensor} -> {name: float}, averaged over the ranks: one collective, one host
    read for every metric together."""
    keys = sorted(metrics)
    vals = torch.stack([metrics[k].detach().float().to(ranks.device) for k in keys])
    vals = sum_over_ranks(vals, ranks) / ranks.world
    return dict(zip(keys, vals.tolist()))
