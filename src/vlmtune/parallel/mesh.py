"""Process group and data-parallel mesh from the torchrun environment (or a single process)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: object  # DeviceMesh over the data-parallel ranks


def init_distributed(device: str = "auto") -> DistInfo:
    """Reads WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (set by torchrun). Without them this is a
    world of one, still with a process group so the same FSDP code path runs everywhere. NCCL on GPUs,
    gloo on CPU."""
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; set train.device=cpu")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world)
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, mesh=mesh)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
