"""FSDP2 (`fully_shard`) for Qwen3-VL: one unit per vision block and decoder layer, one per merger, the token
embedding and the lm_head (unless tied), the rest at the root; activation checkpointing and per-block
`torch.compile`, all applied to a meta-built model from outside.

Activation checkpointing modes (`model.activation_checkpointing`):
- `none`;
- `selective`: recompute only the core attention (softmax(QK^T)V) of every layer, as Megatron's / MindSpeed-MM's
  `--recompute-granularity selective` does (with FlashAttention its saved state is already small);
- `every_other`: recompute every second block (vision blocks, then decoder layers) whole;
- `full`: recompute every block whole (Megatron's `--recompute-granularity full --recompute-method uniform`).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint

from vlmtune.models.qwen3_vl import Qwen3VL
from vlmtune.models.qwen3_vl.attention import CoreAttention
from vlmtune.models.qwen3_vl.moe import SparseMoE

from .context import apply_context_parallel
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


def call_lm_head(head: nn.Module, fn: Callable, hidden: torch.Tensor) -> torch.Tensor:
    """`fn(head.weight, hidden)`: how a root reads the lm_head's weight (the chunked loss never calls the
    Linear itself). When `apply_fsdp` made the lm_head its own unit, this runs as one of its FSDP forward
    methods, so the weight is gathered only for the loss and its backward."""
    method = getattr(head, "fsdp_call", None)
    return method(fn, hidden) if method is not None else fn(head.weight, hidden)


def _fsdp_call(self, fn, hidden):
    return fn(self.weight, hidden)


def _own_units(model: Qwen3VL, root: nn.Module) -> list[tuple[nn.Module, bool]]:
    """(module, reshard_after_forward) of the units besides the blocks, each gathered only while it runs:
    the mergers and, for a root that declares `embedding_and_head_units` (it reads the lm_head through
    `call_lm_head` and runs any dummy vision pass before the embedding, so every rank gathers the units in
    one order), the token embedding and the lm_head. Tied embeddings (2B/4B) share one weight between first
    and last use: they stay in the root unit."""
    units = []
    if model.visual is not None:  # None on later pipeline stages; a split tower may lack some mergers
        mergers = (model.visual.merger, *model.visual.deepstack_merger_list)
        units += [(m, True) for m in mergers if m is not None]
    if model.args.tie_word_embeddings or not getattr(root, "embedding_and_head_units", False):
        return units
    embed, head = model.language_model.embed_tokens, model.lm_head
    if embed is not None:
        units.append((embed, True))
    if head is not None:
        units.append((head, False))  # backward starts with it: keep it gathered from its forward on
    return units


def _needs_sum_reduction(mesh) -> bool:
    """A custom gradient divide factor makes FSDP2 reduce-scatter with PREMUL_SUM, which gloo lacks (NCCL has
    it): on the CPU, sum and then divide. Only where a reduce-scatter runs: with one shard rank torch (2.13)
    divides the copied gradient by the factor and then, when sums are forced, once more."""
    return (
        mesh.device_type == "cpu"
        and mesh.shape[-1] > 1
        and hasattr(FSDPModule, "set_force_sum_reduction_for_comms")  # torch >= 2.12
    )


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
    """Shard every block of `model`, the units of `_own_units`, then `root` (the module whose forward
    computes the loss), which keeps what is left (patch embedding, position table, final norm).
    `ignored_params` stay whole on every rank, outside FSDP (QLoRA's NF4 weights on one data-parallel rank).

    `reshard_after_forward` (free the gathered weights after forward, gather again in backward) is True for
    every unit except the last block, the lm_head and the root, which backward needs first (PyTorch's own
    advice for the root). With expert parallelism the experts of each sparse block are their own FSDP unit
    over `expert_mesh` (the data-parallel ranks holding the same experts). Their gradients already sum the
    tokens of the whole ep group, so they are divided by the full data-parallel size
    (`expert_divide_factor`) instead of the size of `expert_mesh`, which keeps them equal to one process's."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = {"mp_policy": mp, "ignored_params": ignored_params}
    all_blocks = blocks(model)
    for i, block in enumerate(all_blocks):
        reshard = i < len(all_blocks) - 1
        experts = getattr(getattr(block, "mlp", None), "experts", None)
        if expert_mesh is not None and experts is not None:
            fully_shard(experts, mesh=expert_mesh, reshard_after_forward=reshard, **kw)
            if expert_divide_factor is not None:
                experts.set_gradient_divide_factor(expert_divide_factor)
                if _needs_sum_reduction(expert_mesh):
                    experts.set_force_sum_reduction_for_comms(True)
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, **kw)
    for module, reshard in _own_units(model, root):
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard, **kw)
        if module is model.lm_head:
            module.fsdp_call = types.MethodType(_fsdp_call, module)
            register_fsdp_forward_method(module, "fsdp_call")
    fully_shard(root, mesh=mesh, reshard_after_forward=False, **kw)


def apply_compile(model: Qwen3VL, *, backend: str = "inductor") -> None:
    """`torch.compile` each block (after activation checkpointing, before FSDP, as torchtitan does), on the
    instance's `forward` so parameter names and FSDP's hooks around `__call__` stay as they are. Dense
    decoder layers and vision blocks compile as one graph (`fullgraph=True`: nothing in them needs the
    host); sparse layers may break the graph where their expert path needs host sizes (expert parallelism's
    all-to-all splits, the per-expert loop without a grouped GEMM).

    A MoE layer records its routing (aux loss, expert-load logging) as module state; eagerly, a checkpoint's
    recompute skips that (`SparseMoE.forward`). Traced under a checkpoint, Dynamo is told the same where it
    has the option (torch 2.13 does); without it the graph breaks at the checkpoint."""
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in blocks(model):
        sparse = isinstance(getattr(block, "mlp", None), SparseMoE)
        block.forward = torch.compile(block.forward, backend=backend, fullgraph=not sparse)


def parallelize(
    root: nn.Module,
    model: Qwen3VL,
    info,
    *,
    dtype: torch.dtype,
    mixed_precision: str,
    activation_checkpointing: str,
    compile: bool = False,
    ignored_params: set | None = None,
) -> None:
    """Expert parallelism -> activation checkpointing -> context parallelism (`parallel.cp`) ->
    `torch.compile` per block (`compile`; inductor on CUDA, the eager backend elsewhere: a check that every
    block traces, no speed-up) -> FSDP over the data- and context-parallel ranks, on a meta model (`info`:
    the DistInfo of `parallel.mesh.init_distributed`). bf16 compute reduces gradients in fp32, otherwise in
    the master dtype."""
    ep = info.parallel.ep > 1
    if ep:
        apply_expert_parallel(model, info.mesh["ep"])
    apply_activation_checkpointing(model, activation_checkpointing)
    if info.parallel.cp > 1:  # after checkpointing: `selective` then recomputes the kernel, not the exchange
        apply_context_parallel(model, info.mesh["cp"])
    if compile:
        apply_compile(model, backend="inductor" if info.device.type == "cuda" else "eager")
    compute = torch.bfloat16 if mixed_precision == "bf16" else dtype
    reduce = torch.float32 if mixed_precision == "bf16" else dtype
    apply_fsdp(
        root,
        model,
        info.fsdp_mesh,
        param_dtype=compute,
        reduce_dtype=reduce,
        expert_mesh=info.expert_fsdp_mesh if ep else None,
        expert_divide_factor=float(info.grad_ranks) if ep else None,
        ignored_params=ignored_params,
    )
