"""FSDP2 (`fully_shard`) for Qwen3-VL: one unit per vision block and decoder layer, the rest at the root.

The model is built on the meta device, sharded, then allocated shard by shard: each rank holds only its
slice of every parameter, and checkpoint tensors are streamed one at a time into those slices.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.experimental import implicit_replication
from torch.utils.checkpoint import checkpoint

from vlmtune.models.qwen3_vl import Qwen3VL, load_config
from vlmtune.models.qwen3_vl.hf_io import load_weights


def blocks(model: Qwen3VL) -> list[nn.Module]:
    """The repeated blocks: vision blocks, then decoder layers (FSDP units and checkpointing targets)."""
    vision = model.visual.blocks.values() if model.visual is not None else []  # None on later pipeline stages
    return [*vision, *model.language_model.layers.values()]


def apply_activation_checkpointing(model: Qwen3VL, mode: str) -> None:
    """Recompute a block's activations in backward: `full` every block, `selective` every second block.

    The block's `forward` is replaced on the instance so parameter names (and checkpoints) are unchanged;
    FSDP's hooks run around `__call__`, so the recomputation sees already-gathered parameters."""
    if mode == "none":
        return
    every = {"full": 1, "selective": 2}[mode]
    for i, block in enumerate(blocks(model)):
        if i % every:
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def apply_fsdp(
    root: nn.Module,
    model: Qwen3VL,
    mesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    expert_mesh=None,
    expert_divide_factor: float | None = None,
):
    """Shard every block of `model`, then `root` (the module whose forward computes the loss).

    With expert parallelism the experts of each sparse block are their own FSDP unit over `expert_mesh`
    (the data-parallel ranks holding the same experts). Their gradients already sum the tokens of the
    whole ep group, so they are divided by the full data-parallel size (`expert_divide_factor`) instead of
    the size of `expert_mesh`, which keeps them equal to one process's."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in blocks(model):
        experts = getattr(getattr(block, "mlp", None), "experts", None)
        if expert_mesh is not None and experts is not None:
            fully_shard(experts, mesh=expert_mesh, mp_policy=mp)
            if expert_divide_factor is not None:
                experts.set_gradient_divide_factor(expert_divide_factor)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(root, mesh=mesh, mp_policy=mp)


def shard_and_load(
    root: nn.Module,
    model: Qwen3VL,
    info,
    path: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    mixed_precision: str,
    activation_checkpointing: str,
    partial: bool = False,
) -> None:
    """Expert parallelism -> activation checkpointing -> FSDP -> allocation -> streaming this rank's slices
    of the checkpoint in (`partial`: a pipeline stage holding part of the model)."""
    from vlmtune.parallel.expert import apply_expert_parallel

    ep = info.parallel.ep > 1
    if ep:
        apply_expert_parallel(model, info.mesh["ep"])
    apply_activation_checkpointing(model, activation_checkpointing)
    compute = torch.bfloat16 if mixed_precision == "bf16" else dtype
    # bf16 compute reduces gradients in fp32; otherwise in the master dtype.
    reduce = torch.float32 if mixed_precision == "bf16" else dtype
    apply_fsdp(
        root,
        model,
        info.fsdp_mesh,
        param_dtype=compute,
        reduce_dtype=reduce,
        expert_mesh=info.expert_fsdp_mesh if ep else None,
        expert_divide_factor=float(info.dp_size) if ep else None,
    )
    root.to_empty(device=device)
    # A full checkpoint tensor copied into a sharded parameter keeps only this rank's slice (no comms).
    with implicit_replication():
        load_weights(model, path, partial=partial)
    model.source_dir = path


def build_sharded_model(
    path: str,
    root_factory,
    info,
    device: torch.device | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    mixed_precision: str = "fp32",
    activation_checkpointing: str = "none",
    prepare=None,
):
    """Meta build -> `prepare(model)` (freezing) -> tensor / expert parallelism -> checkpointing -> FSDP ->
    per-shard allocation and loading. `info` is the DistInfo of `parallel.mesh.init_distributed`.

    `root_factory(model)` wraps the model in the module whose forward the trainer calls (the FSDP root).
    Returns (root, model)."""
    from vlmtune.parallel.tensor import apply_tensor_parallel

    device = device or info.device
    p = info.parallel
    args = load_config(path)
    with torch.device("meta"):
        model = Qwen3VL(args).to(dtype)
    if prepare is not None:
        prepare(model)
    if p.tp > 1:
        # Training never gathers logits: the chunked loss is vocab-parallel (see train/loss.py).
        apply_tensor_parallel(model, info.mesh["tp"], gather_logits=False)
    root = root_factory(model)
    shard_and_load(
        root, model, info, path, device=device, dtype=dtype, mixed_precision=mixed_precision,
        activation_checkpointing=activation_checkpointing,
    )  # fmt: skip
    return root, model
