"""Process group and the device mesh of the `parallel:` layout, from the torchrun environment (or one process)."""

from __future__ import annotations

import atexit
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vlmtune.errors import ConfigError

from .layout import ParallelConfig, build_mesh, resolve


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: object  # LayoutMesh: pp, dp_replicate, dp_shard_mod_ep, cp, ep, tp + flattened (layout.py)
    parallel: ParallelConfig  # resolved sizes

    @property
    def dp_rank(self) -> int:
        """This rank's data shard: ranks that differ only in tp, cp (or pp) read the same data."""
        return self.mesh["dp"].get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.mesh["dp"].size()

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group()

    @property
    def fsdp_mesh(self):
        """FSDP2 mesh for non-expert weights: shard over dp_shard x cp, replicate over dp_replicate (HSDP)."""
        return self.mesh["hsdp"] if self.parallel.dp_replicate > 1 else self.mesh["dp_shard_cp"]

    @property
    def expert_fsdp_mesh(self):
        return self.mesh["expert_hsdp"] if self.parallel.dp_replicate > 1 else self.mesh["dp_shard_mod_ep_cp"]

    @property
    def grad_ranks(self) -> int:
        """The ranks whose gradients FSDP averages (every data-parallel and context-parallel rank)."""
        return self.dp_size * self.parallel.cp


def world_size() -> int:
    """Processes in this run: torchrun's WORLD_SIZE, 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto", parallel: ParallelConfig | None = None, args=None) -> DistInfo:
    """Reads WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (set by torchrun). Without them this is a
    world of one, still with a process group so the same FSDP code path runs everywhere. NCCL on GPUs,
    gloo on CPU. `parallel` (checked against `args`, the model's ModelArgs) shapes the mesh; default: FSDP
    over every rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(
            "train.device: cuda, but no CUDA device is visible; set train.device: cpu (or auto)"
        )
    layout = resolve(parallel or ParallelConfig(), world, args)  # before any process group: errors come early
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    # One backend per run (docs/gpu.md): NCCL takes CUDA tensors only, so every collective goes through
    # parallel/collectives.py, which puts host numbers on this device. `device_id` binds the group to it.
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        atexit.unregister(release_process_groups)  # registered once per process
        atexit.register(release_process_groups)
        kw = {"device_id": dev} if use_cuda else {}
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kw)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world, **kw)
    mesh = build_mesh(layout, dev.type)
    return DistInfo(
        rank=rank, world_size=world, local_rank=local_rank, device=dev, mesh=mesh, parallel=layout
    )


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    release_process_groups()


def release_process_groups() -> None:
    """Free the process groups that destroyed groups leave behind in reference cycles (FSDP states, meshes,
    the model), so their threads stop while Python still runs. gloo runs collectives on worker threads; one
    that frees a finished collective's tensors during interpreter shutdown needs the GIL it can no longer
    take, and the process aborts ("terminate called without an active exception") after the run succeeded.
    Also registered with `atexit`, for an exit where the caller's frames still held the model."""
    if not dist.is_initialized():
        gc.collect()
