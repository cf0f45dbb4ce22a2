"""Tensor-parallel placements of LoRA adapters, consistent with their base Linear's plan (parallel/tensor.py).

The adapters run inside the base Linear's forward, on the DTensor input its plan prepared:
- column-parallel base (weight `Shard(0)`, input replicated): `lora_A` replicated, `lora_B` `Shard(0)` on
  its output dim, so `B(A(x))` comes out sharded exactly like the base output;
- row-parallel base (weight `Shard(1)`, input sharded on the features): `lora_A` `Shard(1)` on its input
  dim, `lora_B` replicated; `B(A(x))` is a partial sum that joins the base output's one all-reduce.
Adapters of Linears tensor parallelism leaves whole stay plain tensors.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from vlmtune.models.qwen3_vl.lora import LoRALinear

_PLACEMENTS = {0: (Replicate(), Shard(0)), 1: (Shard(1), Replicate())}  # base shard dim -> (A, B)


def _distribute(module: nn.Module, name: str, mesh, placement) -> None:
    p = getattr(module, name)
    module.register_parameter(
        name, nn.Parameter(distribute_tensor(p.data, mesh, [placement]), requires_grad=p.requires_grad)
    )


def apply_adapter_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Distribute every adapter of a tensor-parallel base Linear over `tp_mesh` (see module docstring)."""
    for module in model.modules():
        if not isinstance(module, LoRALinear) or not isinstance(module.weight, DTensor):
            continue
        (placement,) = module.weight.placements
        if not isinstance(placement, Shard) or placement.dim not in _PLACEMENTS:
            raise ValueError(f"LoRA on a tensor-parallel Linear placed {placement}: no adapter plan")
        a, b = _PLACEMENTS[placement.dim]
        if "lora_A" in module._modules:  # vision k/v share q_proj's A (q/k/v have the same plan)
            _distribute(module.lora_A, "weight", tp_mesh, a)
        _distribute(module.lora_B, "weight", tp_mesh, b)
