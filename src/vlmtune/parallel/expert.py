"""Expert parallelism: each of `ep` ranks holds E/ep experts; tokens travel to their experts by all-to-all.

Per sparse layer and micro-batch:
1. route locally, sort the (token, expert) pairs by expert — experts of one rank are contiguous, so the
   sorted rows are already grouped by destination rank;
2. exchange per-expert row counts, copy them to the host once (all-to-all split sizes are host ints: the one
   host sync of an expert-parallel layer), then the rows (`all_to_all_single`, differentiable);
3. regroup the received rows by local expert and run the grouped expert compute (one grouped GEMM, or one
   matmul per active expert);
4. send results back by the reverse all-to-all, weight by the router and sum per token.

Expert weights become DTensors `Shard(0)` over the ep mesh, so DCP checkpoints hold the full `[E, ...]`
tensors and load into any other layout. Non-expert parameters stay replicated over ep (FSDP shards them).
The router aux loss of a rank is computed from its own tokens, as in data parallelism.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from vlmtune.errors import ParallelError
from vlmtune.models.qwen3_vl.moe import Experts, count_per_expert, grouped_mm_supported, sparse_blocks

from .collectives import all_to_all_counts, all_to_all_rows


def validate_expert_parallel(num_experts: int, ep: int) -> None:
    if num_experts % ep:
        ok = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ParallelError(f"parallel.ep={ep} does not divide num_experts={num_experts}; use one of {ok}")


def _split_sizes(send: list[int], recv: list[int], ep: int, local_e: int) -> tuple[list[int], list[int]]:
    """Rows per destination rank and per source rank, from per-(rank, local expert) host counts."""
    per_rank = [slice(r * local_e, (r + 1) * local_e) for r in range(ep)]
    return [sum(send[s]) for s in per_rank], [sum(recv[s]) for s in per_rank]


def _ep_forward(self: Experts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor):
    group, ep = self.ep_group, self.ep_size
    gate_up = self.gate_up_proj.to_local() if isinstance(self.gate_up_proj, DTensor) else self.gate_up_proj
    down = self.down_proj.to_local() if isinstance(self.down_proj, DTensor) else self.down_proj
    local_e = gate_up.shape[0]
    k = index.shape[1]
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = count_per_expert(flat, local_e * ep)  # [E] rows this rank sends to each expert
    rows = x[order // k]
    # Row counts per (source rank, local expert) on the receiving side.
    recv_counts = all_to_all_counts(counts, group)
    # The all-to-all split sizes must be host ints: one copy of both count vectors, the one sync of the layer.
    host = torch.cat([counts, recv_counts]).tolist()
    send_splits, recv_splits = _split_sizes(host[: local_e * ep], host[local_e * ep :], ep, local_e)
    received = all_to_all_rows(rows, recv_splits, send_splits, group)
    # Received rows are grouped by source rank, then local expert: regroup by local expert.
    expert_of_row = torch.repeat_interleave(
        torch.arange(local_e, device=x.device).repeat(ep), recv_counts, output_size=sum(recv_splits)
    )
    perm = torch.argsort(expert_of_row, stable=True)
    grouped = self.use_grouped_mm
    if grouped is None:
        grouped = grouped_mm_supported(x, gate_up, down)
    per_expert = recv_counts.view(ep, local_e).sum(0)
    y_sorted = self.swiglu(received[perm], gate_up, down, per_expert, grouped=grouped)
    y = torch.empty_like(y_sorted).index_copy(0, perm, y_sorted)
    back = all_to_all_rows(y, send_splits, recv_splits, group)
    back = back * weights.reshape(-1)[order, None]
    # Back to (token, slot) order, then sum each token's k slots: the same reduction as the one-device path.
    back = torch.zeros_like(back).index_copy(0, order, back)
    return back.view(-1, k, back.shape[-1]).sum(1).to(x.dtype), counts


def apply_expert_parallel(model: nn.Module, ep_mesh) -> None:
    """Shard every sparse layer's experts over the 1-D `ep_mesh` and route tokens with all-to-all."""
    ep = ep_mesh.size()
    blocks = sparse_blocks(model)
    if not blocks:
        raise ParallelError("parallel.ep > 1 needs a MoE model (qwen3_vl_moe); this model has no experts")
    validate_expert_parallel(blocks[0].num_experts, ep)
    for moe in blocks:
        ex = moe.experts
        for name, p in list(ex.named_parameters(recurse=False)):  # every parameter is per expert (LoRA too)
            ex.register_parameter(
                name,
                nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)]), requires_grad=p.requires_grad),
            )
        ex.ep_group, ex.ep_size = ep_mesh.get_group(), ep
        ex.forward = types.MethodType(_ep_forward, ex)
