"""FSDP2 (`fully_shard`) for Qwen3-VL: one unit per vision block and decoder layer, the rest at the root; and
activation checkpointing, applied to a meta-built model from outside.

Activation checkpointing modes (`model.activation_checkpointing`):
- `none`;
- `selective`: recompute only the core attention (softmax(QK^T)V) of every layer, as Megatron's / MindSpeed-MM's
  `--recompute-granularity selective` does (with FlashAttention its saved state is already small);
- `every_other`: recompute every second block (vision blocks, then decoder layers) whole;
- `full`: recompute every block whole (Megatron's `--recompute-granularity full --recompute-method uniform`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from vlmtune.models.qwen3_vl import Qwen3VL
from vlmtune.models.qwen3_vl.attention import CoreAttention

from .expert import apply_expert_parallel

AC_MODES = ("none", "selective", "every_other", "full")


def blocks(model: Qwen3VL) -> list[nn.Module]:
    """The repeated blocks: vision blocks, then decoder layers (FSDP units and checkpointing targets)."""
    vision = model.visual.blocks.values() if model.visual is not None else []  # None on later pipeline stages
    return [*vision, *model.language_model.layers.values()]


def _recompute_in_backward(module: nn.Module) -> None:
    """Replace the module's `forward` on the instance by a checkpointed call: parameter names (and so
    checkpoints) are unchanged, and FSDP's hooks around `__call__` see already-gathered parameters."""
    inner = module.forward

    def forward(*args, _inner=inner, **kwargs):
        return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def apply_activation_checkpointing(model: Qwen3VL, mode: str) -> None:
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {AC_MODES}")
    if mode == "selective":
        for m in model.modules():
            if isinstance(m, CoreAttention):
                _recompute_in_backward(m)
    elif mode in ("every_other", "full"):
        every = 1 if mode == "full" else 2
        for i, block in enumerate(blocks(model)):
            if i % every == 0:
                _recompute_in_backward(block)


def apply_fsdp(
    root: nn.Module,
    model: Qwen3VL,
    mesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    expert_mesh=None,
    expert_divide_factor: float | None = None,
    ignored_params: set | None = None,
):
    """Shard every block of `model`, then `root` (the module whose forward computes the loss).
    `ignored_params` stay whole on every rank, outside FSDP (QLoRA's NF4 weights on one data-parallel rank).

    With expert parallelism the experts of each sparse block are their own FSDP unit over `expert_mesh`
    (the data-parallel ranks holding the same experts). Their gradients already sum the tokens of the
    whole ep group, so they are divided by the full data-parallel size (`expert_divide_factor`) instead of
    the size of `expert_mesh`, which keeps them equal to one process's."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = {"mp_policy": mp, "ignored_params": ignored_params}
    for block in blocks(model):
        experts = getattr(getattr(block, "mlp", None), "experts", None)
        if expert_mesh is not None and experts is not None:
            fully_shard(experts, mesh=expert_mesh, **kw)
            if expert_divide_factor is not None:
                experts.set_gradient_divide_factor(expert_divide_factor)
        fully_shard(block, mesh=mesh, **kw)
    fully_shard(root, mesh=mesh, **kw)


def parallelize(
    root: nn.Module,
    model: Qwen3VL,
    info,
    *,
    dtype: torch.dtype,
    mixed_precision: str,
    activation_checkpointing: str,
    ignored_params: set | None = None,
) -> None:
    """Expert parallelism -> activation checkpointing -> FSDP over the data-parallel ranks, on a meta model
    (`info`: the DistInfo of `parallel.mesh.init_distributed`). bf16 compute reduces gradients in fp32,
    otherwise in the master dtype."""
    ep = info.parallel.ep > 1
    if ep:
        apply_expert_parallel(model, info.mesh["ep"])
    apply_activation_checkpointing(model, activation_checkpointing)
    compute = torch.bfloat16 if mixed_precision == "bf16" else dtype
    reduce = torch.float32 if mixed_precision == "bf16" else dtype
    apply_fsdp(
        root,
        model,
        info.fsdp_mesh,
        param_dtype=compute,
        reduce_dtype=reduce,
        expert_mesh=info.expert_fsdp_mesh if ep else None,
        expert_divide_factor=float(info.dp_size) if ep else None,
        ignored_params=ignored_params,
    )
