"""Context parallelism (`parallel.cp`): the `cp` ranks of one data shard share each packed row. The decoder
runs DeepSpeed-Ulysses; the vision tower runs whole images / frame-pairs per rank.

Per micro-batch (every cp rank holds the same row; `context_split` plans the split on the host):

1. **Vision.** Each rank runs the tower on its own images and frame-pairs (balanced by patch count; vision
   attention never crosses one), then one all-to-all sends every merged feature, with its DeepStack
   features, to the rank whose slice holds its placeholder token. A rank without a unit runs the dummy
   grid, so every rank runs the same FSDP units.
2. **Decoder.** Each rank embeds its contiguous `L/cp` tokens, scatters the features it received, and runs the
   layers with its own MRoPE positions and DeepStack features. Around the attention kernel (`CoreAttention`)
   one all-to-all turns q/k/v from `[1, H, L/cp, D]` (every head, the slice) into `[1, H/cp, L, D]` (this
   rank's heads, the whole row); the normal kernel runs with the whole row's `cu_seqlens` (FlashAttention
   varlen on CUDA, SDPA with the row's mask on the CPU), and a second all-to-all returns `[1, L/cp, H, D]`.
   With fewer key/value heads than `cp`, they are repeated first so each rank holds the one its query heads
   read (as Ulysses implementations do).
3. **Loss.** Each rank scores its own positions (targets were shifted before the split), weighted by the
   whole row's loss weights, so every loss mode stays exact. The MoE router statistics are summed over the
   cp ranks (differentiably), so the aux loss is the whole row's.

Parameters are FSDP-sharded over dp_shard x cp (a cp rank is a data-parallel rank for parameters, as in
torchtitan's `dp_shard_cp`), but cp ranks read the same data: the loader's `dp_rank` / `dp_size` exclude cp.
Activation memory per rank is about `1/cp` of the row's; the cost is two all-to-alls of q/k/v-sized
tensors per layer (each rank sends `(cp - 1)/cp` of them).
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from vlmtune.errors import ParallelError
from vlmtune.models.qwen3_vl import ModelArgs
from vlmtune.models.qwen3_vl.attention import build_mask, uses_varlen
from vlmtune.models.qwen3_vl.model import ModelOutput, Qwen3VL, VisionOutput
from vlmtune.models.qwen3_vl.moe import pooled_aux_loss, router_statistics, sparse_blocks
from vlmtune.models.qwen3_vl.rope import text_rope_cos_sin

from .collectives import all_reduce_autograd, all_to_all_rows
from .context_split import RowShard, shard_row


def context_sizes(args: ModelArgs, tp: int = 1) -> list[int]:
    """The cp sizes Ulysses can run: they divide the query heads of a tensor-parallel rank, and divide its
    key/value heads or are a multiple of them (key/value heads are then repeated)."""
    hq, hkv = args.text.num_attention_heads // tp, args.text.num_key_value_heads // tp
    return [c for c in range(1, hq + 1) if hq % c == 0 and (hkv % c == 0 or c % hkv == 0)]


def validate_context_parallel(cp: int, tp: int, pp: int, args: ModelArgs | None) -> None:
    if cp == 1:
        return
    if pp > 1:
        raise ParallelError(
            "parallel.cp > 1 with parallel.pp > 1 is not supported: pipeline stages pass whole-row activations "
            "of a fixed shape and the first stage runs the vision tower on all media; use cp with dp_shard, tp "
            "and ep"
        )
    if args is None:
        return
    ok = context_sizes(args, tp)
    if cp not in ok:
        hq, hkv = args.text.num_attention_heads // tp, args.text.num_key_value_heads // tp
        raise ParallelError(
            f"parallel.cp={cp} does not fit {hq} query / {hkv} key-value heads per tensor-parallel rank "
            f"(Ulysses gives each cp rank heads/cp query heads; ring attention is not built); cp can be one "
            f"of {', '.join(map(str, ok))}"
        )


# ------------------------------------------------------------------------------------------ Ulysses
def _seq_to_heads(tensors: list[torch.Tensor], group, cp: int) -> list[torch.Tensor]:
    """`[1, H_i, L/cp, D]` each -> `[1, H_i/cp, L, D]` each, in one all-to-all: head group g goes to rank g,
    and the slices arrive in rank order, which is the row's order (contiguous split)."""
    heads = [t.shape[1] // cp for t in tensors]
    _, _, n, d = tensors[0].shape
    send = torch.cat([t[0].unflatten(0, (cp, h)) for t, h in zip(tensors, heads)], dim=1)
    got = all_to_all_rows(send.flatten(1), [1] * cp, [1] * cp, group)
    got = got.view(cp, sum(heads), n, d).transpose(0, 1).reshape(sum(heads), cp * n, d)
    return [x.unsqueeze(0) for x in got.split(heads, dim=0)]


def _heads_to_seq(out: torch.Tensor, group, cp: int) -> torch.Tensor:
    """The attention output `[1, L, H/cp, D]` -> `[1, L/cp, H, D]` (slice s to rank s; heads in rank order)."""
    _, length, h, d = out.shape
    n = length // cp
    got = all_to_all_rows(out[0].reshape(cp, n * h * d), [1] * cp, [1] * cp, group)
    return got.view(cp, n, h, d).transpose(0, 1).reshape(1, n, cp * h, d)


def _ulysses(self, q, k, v, *, attention_mask=None, cu_seqlens=None, mask=None, max_seqlen=None):
    """`CoreAttention.forward` of a decoder layer under context parallelism (see the module docstring)."""
    if not self.cp_on:  # `whole_sequences`: this rank attends over whole sequences of its own
        return self.cp_inner(q, k, v, attention_mask=attention_mask, cu_seqlens=cu_seqlens, mask=mask,
                             max_seqlen=max_seqlen)  # fmt: skip
    if attention_mask is not None or q.shape[0] != 1:
        raise ValueError("context parallelism runs packed rows (one row with cu_seqlens), not padded batches")
    group, cp = self.cp_group, self.cp_size
    if k.shape[1] < cp:
        k, v = (t.repeat_interleave(cp // t.shape[1], dim=1) for t in (k, v))
    q, k, v = _seq_to_heads([q, k, v], group, cp)
    out = self.cp_inner(q, k, v, cu_seqlens=cu_seqlens, mask=mask, max_seqlen=max_seqlen)
    return _heads_to_seq(out, group, cp)


def apply_context_parallel(model: Qwen3VL, cp_mesh) -> None:
    """Wrap every decoder layer's core attention in the Ulysses all-to-alls over the 1-D `cp_mesh` (after
    activation checkpointing: a `selective` recompute then recomputes the kernel alone, not the exchange)."""
    group, cp = cp_mesh.get_group(), cp_mesh.size()
    for layer in model.language_model.layers.values():
        core = layer.self_attn.core_attention
        core.cp_inner, core.cp_group, core.cp_size, core.cp_on = core.forward, group, cp, True
        core.forward = types.MethodType(_ulysses, core)


@contextlib.contextmanager
def whole_sequences(model: Qwen3VL):
    """The Ulysses exchange off: each cp rank runs whole sequences itself. Generation during training uses
    it: the cp ranks of a data shard decode the same prompts in lockstep (FSDP all-gathers still run over
    dp_shard x cp); splitting a one-token decode step over ranks would gain nothing."""
    cores = [layer.self_attn.core_attention for layer in model.language_model.layers.values()]
    cores = [c for c in cores if hasattr(c, "cp_on")]
    for core in cores:
        core.cp_on = False
    try:
        yield
    finally:
        for core in cores:
            core.cp_on = True


# ------------------------------------------------------------------------------------------ one row
def _dummy_vision(visual: nn.Module, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The tower on a 1 x merge x merge grid of zeros (as `VisionTower.dummy_pass`), outputs kept."""
    merge = visual.args.spatial_merge_size
    weight = visual.patch_embed.proj.weight
    x = torch.zeros(merge * merge, visual.args.patch_dim, device=device, dtype=weight.dtype)
    return visual(x, torch.tensor([[1, merge, merge]]))


class ContextParallel:
    """The cp ranks of one data shard: `shard` cuts a packed row (host), `forward` runs the model on the slice."""

    def __init__(self, cp_mesh, loss_group, args: ModelArgs):
        self.group, self.size, self.rank = cp_mesh.get_group(), cp_mesh.size(), cp_mesh.get_local_rank()
        self.loss_group = loss_group  # every rank holding part of the step's loss: dp x cp
        self.args = args

    def shard(self, batch, weights: torch.Tensor) -> tuple[RowShard, torch.Tensor]:
        """This rank's slice of `batch` (a PackedBatch on the host) and of its loss weights `[L]`."""
        return shard_row(batch, weights, cp=self.size, rank=self.rank, args=self.args)

    def forward(self, model: Qwen3VL, shard: RowShard) -> tuple[ModelOutput, torch.Tensor | None]:
        """(final hidden states of the slice and the aux loss's share, the dummy vision output or None)."""
        vision, dummy = self._vision(model, shard)
        h, visual_index, deepstack = model.embed(shard.input_ids, vision)
        t = model.args.text
        cos, sin = text_rope_cos_sin(shard.position_ids, t.head_dim, t.rope_theta, t.mrope_section, h.dtype)
        mask = None
        if not uses_varlen(h):  # the whole row's mask: attention runs on the whole row for this rank's heads
            mask = build_mask(
                shard.length, shard.length, causal=True, attention_mask=None, cu_seqlens=shard.cu_seqlens,
                device=h.device,
            )  # fmt: skip
        h = model.language_model(
            h, cos, sin, visual_index=visual_index, deepstack=deepstack, cu_seqlens=shard.cu_seqlens, mask=mask,
            max_seqlen=shard.max_seqlen,
        )  # fmt: skip
        return ModelOutput(hidden_states=h, aux_loss=self._aux_loss(model, shard)), dummy

    def _vision(self, model: Qwen3VL, shard: RowShard) -> tuple[VisionOutput | None, torch.Tensor | None]:
        """This rank's units through the tower (or the dummy grid), then the exchange: the features of this
        slice's placeholder tokens, at their slice positions."""
        visual, device = model.visual, shard.input_ids.device
        dummy = None
        if shard.pixel_values is not None:
            x = shard.pixel_values.to(visual.patch_embed.proj.weight.dtype)
            features, deepstack = visual(x, shard.grid_thw)
        else:
            features, deepstack = _dummy_vision(visual, device)
            dummy = features.float().sum() + sum(d.float().sum() for d in deepstack)
        ex = shard.exchange
        if ex is None:
            return None, dummy
        rows = torch.cat([features, *deepstack], dim=1)
        # A rank without units still sends (nothing) from the dummy output: its backward then takes part in
        # the reverse all-to-all that returns the gradients of the features it received.
        rows = rows[:0] if dummy is not None else rows[ex.send_order.to(device, non_blocking=True)]
        got = all_to_all_rows(rows, ex.recv_splits, ex.send_splits, self.group)
        parts = got.split(features.shape[1], dim=1)
        index = ex.recv_positions.to(device, non_blocking=True)
        return VisionOutput(parts[0], list(parts[1:]), visual.deepstack_slots(), index), dummy

    def _aux_loss(self, model: Qwen3VL, shard: RowShard) -> torch.Tensor | None:
        """This rank's share (1/cp) of the whole row's router aux loss: the statistics of every slice summed,
        padding left out; the backward gives each slice the gradient of the whole row's loss."""
        blocks = sparse_blocks(model)
        if not blocks:
            return None
        n = shard.input_ids.shape[1]
        position = torch.arange(shard.start, shard.start + n, device=shard.input_ids.device)
        stats = router_statistics(model, (position < shard.real_tokens).float())
        if stats is None:
            return None
        stats = all_reduce_autograd(stats, self.group)
        return pooled_aux_loss(stats, float(shard.real_tokens * len(blocks))) / self.size


def context_parallel(info, args: ModelArgs) -> ContextParallel | None:
    """The ContextParallel of a DistInfo (`parallel.mesh.init_distributed`), None when `parallel.cp` is 1."""
    if info.parallel.cp == 1:
        return None
    return ContextParallel(info.mesh["cp"], info.mesh["dp_cp"].get_group(), args)
