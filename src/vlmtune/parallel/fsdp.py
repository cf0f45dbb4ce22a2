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
    return [*model.visual.blocks.values(), *model.language_model.layers.values()]


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


def apply_fsdp(root: nn.Module, model: Qwen3VL, mesh, *, param_dtype: torch.dtype, reduce_dtype: torch.dtype):
    """Shard every block of `model`, then `root` (the module whose forward computes the loss)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(root, mesh=mesh, mp_policy=mp)


def build_sharded_model(
    path: str,
    root_factory,
    mesh,
    device: torch.device,
    *,
    dtype: torch.dtype = torch.float32,
    mixed_precision: str = "fp32",
    activation_checkpointing: str = "none",
    prepare=None,
):
    """Meta build -> `prepare(model)` (freezing) -> checkpointing -> FSDP -> per-shard allocation and loading.

    `root_factory(model)` wraps the model in the module whose forward the trainer calls (the FSDP root).
    Returns (root, model)."""
    args = load_config(path)
    with torch.device("meta"):
        model = Qwen3VL(args).to(dtype)
    if prepare is not None:
        prepare(model)
    apply_activation_checkpointing(model, activation_checkpointing)
    root = root_factory(model)
    compute = torch.bfloat16 if mixed_precision == "bf16" else dtype
    # bf16 compute reduces gradients in fp32; otherwise in the master dtype.
    reduce = torch.float32 if mixed_precision == "bf16" else dtype
    apply_fsdp(root, model, mesh, param_dtype=compute, reduce_dtype=reduce)
    root.to_empty(device=device)
    # A full checkpoint tensor copied into a sharded parameter keeps only this rank's slice (no comms).
    with implicit_replication():
        load_weights(model, path)
    model.source_dir = path
    return root, model
