"""The one way vlmtune code calls collectives, so every tensor given to one lives on its group's device.

Decision (docs/gpu.md): one backend per run, NCCL on GPUs and gloo on CPUs; no second gloo group for host
numbers. NCCL groups only take CUDA tensors, gloo groups CPU tensors. Host-side numbers (token counts, losses
for logging, flags) are reduced by `all_reduce_host`, which builds the tensor on the group's device and
returns Python floats (a handful per step: the copies cost microseconds). Device tensors go through
`all_reduce_` and the all-to-all helpers, which refuse a tensor on the wrong device with a message instead of
NCCL's "No backend type associated with device type cpu". Without a process group (one process, no torchrun)
every helper is the identity. DTensor, FSDP2 and DCP run their own collectives on the mesh's device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def group_device(group=None) -> torch.device:
    """The device a collective over `group` needs its tensors on: the current CUDA device for NCCL."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_device(tensor: torch.Tensor, group=None) -> None:
    """Raise unless `tensor` is on the device the collectives of `group` take."""
    want = group_device(group)
    if tensor.device.type != want.type:
        raise RuntimeError(
            f"collective on a {tensor.device} tensor over a group that needs {want} tensors; create it on the "
            "compute device (or reduce host numbers with all_reduce_host)"
        )


def all_reduce_(tensor: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of a tensor that must already be on the group's device."""
    if not dist.is_initialized():
        return tensor
    check_device(tensor, group)
    dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor


def all_reduce_host(values, group=None, op: str = "sum") -> list[float]:
    """All-reduce a list of host numbers (float64) over `group`; returns Python floats."""
    values = [float(v) for v in values]
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=group_device(group))
    dist.all_reduce(t, op=_OPS[op], group=group)
    return t.tolist()


def all_to_all_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """Equal-split all-to-all of a 1-D count vector (no gradient): rank r receives every rank's r-th chunk."""
    check_device(counts, group)
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


def all_to_all_rows(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all of the rows of `x`: `in_splits[r]` rows go to rank r, `out_splits[r]` come
    from it (host ints; the backward sends the gradients the other way)."""
    check_device(x, group)
    group = group if group is not None else dist.group.WORLD
    out = all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)
    return out.wait() if hasattr(out, "wait") else out  # AsyncCollectiveTensor


def all_reduce_autograd(tensor: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum over `group` (a new tensor): the backward sums the gradients of every rank's copy,
    so each rank's input gets the gradient of the total loss (context parallelism's router statistics)."""
    if not dist.is_initialized():
        return tensor
    check_device(tensor, group)
    return dist_nn.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def barrier(group=None) -> None:
    """Wait for every rank of `group` (NCCL: on this rank's CUDA device, not a guessed one)."""
    if not dist.is_initialized():
        return
    device = group_device(group)
    dist.barrier(group=group, device_ids=[device.index] if device.type == "cuda" else None)


def all_gather_object(obj, group=None) -> list:
    """Every rank's `obj` (picklable), in rank order. PyTorch moves the pickles through tensors on the
    current CUDA device under NCCL, which `parallel.mesh.init_distributed` sets."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group=None):
    """Rank `src`'s picklable `obj` on every rank (through the group's device, as `all_gather_object`)."""
    if not dist.is_initialized():
        return obj
    payload = [obj]
    dist.broadcast_object_list(payload, src=src, group=group)
    return payload[0]
