"""The one way vlmtune code calls collectives, so every tensor given to one lives on its group's device.

NCCL groups only take CUDA tensors, gloo groups CPU tensors. Host-side numbers (token counts, losses for
logging, flags) are reduced by `all_reduce_host`, which builds the tensor on the group's device and returns
Python floats; device tensors go through `all_reduce_`, which refuses a tensor on the wrong device with a
message instead of NCCL's "No backend type associated with device type cpu". Without a process group (one
process, no torchrun) both are the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def group_device(group=None) -> torch.device:
    """The device a collective over `group` needs its tensors on: the current CUDA device for NCCL."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of a tensor that must already be on the group's device."""
    if not dist.is_initialized():
        return tensor
    want = group_device(group)
    if tensor.device.type != want.type:
        raise RuntimeError(
            f"collective on a {tensor.device} tensor over a group that needs {want} tensors; create it on the "
            "compute device (or reduce host numbers with all_reduce_host)"
        )
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
