"""Tensor parallelism for Qwen3-VL with DTensor plans, applied to a plain model from outside.

Decoder: q/k/v and gate/up are column-parallel (sharded by attention heads / intermediate units), o and down
are row-parallel (partial sums all-reduced), so each layer costs two all-reduces forward and two backward.
q/k RMSNorms run on head-sharded activations; their weights are replicated DTensors whose gradients are
reduced over the heads of all ranks. The token embedding is sharded by vocabulary rows; the lm_head is
column-parallel and either gathers the full logits (inference, `model(...).logits`) or, in training, feeds
`vocab_parallel_cross_entropy`, which never gathers the `[tokens, vocab]` logits.
Vision: q/k/v, MLP fc1 and merger fc1 column-parallel; attention proj, MLP fc2 and merger fc2 row-parallel.
Norms, the patch embedding and the position table are replicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from vlmtune.errors import ParallelError
from vlmtune.models.qwen3_vl import ModelArgs, Qwen3VL


def _divisors_note(name: str, n: int) -> str:
    return f"{name}={n} is divisible by " + ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def validate_tensor_parallel(args: ModelArgs, tp: int) -> None:
    checks = [
        ("text num_attention_heads", args.text.num_attention_heads),
        ("text num_key_value_heads", args.text.num_key_value_heads),
        ("text intermediate_size", args.text.intermediate_size),
        ("vision num_heads", args.vision.num_heads),
        ("vision intermediate_size", args.vision.intermediate_size),
        ("vocab_size", args.text.vocab_size),
    ]
    if args.is_moe:
        checks.append(("num_experts", args.text.num_experts))
    for name, n in checks:
        if n % tp:
            raise ParallelError(f"parallel.tp={tp} does not divide {name}={n}; {_divisors_note(name, n)}")


def decoder_plan(layer) -> dict:
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        # [B, L, heads, head_dim]: the norm runs on this rank's heads; weight grads reduce over all heads.
        "self_attn.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
        "self_attn.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
    }
    if hasattr(layer.mlp, "gate_proj"):  # dense MLP; MoE experts are parallelised by parallel/expert.py
        plan.update(
            {
                "mlp.gate_proj": ColwiseParallel(),
                "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel(),
            }
        )
    return plan


VISION_BLOCK_PLAN = {
    "attn.q_proj": ColwiseParallel(),
    "attn.k_proj": ColwiseParallel(),
    "attn.v_proj": ColwiseParallel(),
    "attn.proj": RowwiseParallel(),
    "mlp.linear_fc1": ColwiseParallel(),
    "mlp.linear_fc2": RowwiseParallel(),
}
MERGER_PLAN = {"linear_fc1": ColwiseParallel(), "linear_fc2": RowwiseParallel()}


def apply_tensor_parallel(model: Qwen3VL, tp_mesh, *, gather_logits: bool = True) -> None:
    """Shard `model` in place over the 1-D `tp_mesh`.

    `gather_logits=False` leaves the lm_head output vocab-sharded (a DTensor); training uses
    `vocab_parallel_cross_entropy` on the hidden states instead and never calls the lm_head module.
    """
    validate_tensor_parallel(model.args, tp_mesh.size())
    parallelize_module(
        model.language_model,
        tp_mesh,
        {"embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())},
    )
    for layer in model.language_model.layers.values():
        parallelize_module(layer, tp_mesh, decoder_plan(layer))
    for block in model.visual.blocks.values():
        parallelize_module(block, tp_mesh, VISION_BLOCK_PLAN)
    for merger in [model.visual.merger, *model.visual.deepstack_merger_list]:
        parallelize_module(merger, tp_mesh, MERGER_PLAN)
    parallelize_module(
        model,
        tp_mesh,
        {
            "lm_head": ColwiseParallel(
                output_layouts=Replicate() if gather_logits else Shard(-1), use_local_output=gather_logits
            )
        },
    )
    if model.args.tie_word_embeddings:
        # Both modules shard the [V, D] matrix by rows: one DTensor serves both, as one Parameter did.
        model.lm_head.weight = model.language_model.embed_tokens.weight
    model.tp_mesh = tp_mesh


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over logits sharded by vocabulary across `group` (rows: tokens, cols: local vocab)."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):
        logits = logits.float()
        local_max = logits.max(dim=-1).values
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - local_max[:, None]
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        dist.all_reduce(sum_exp, group=group)
        local_t = target - vocab_start
        mine = (local_t >= 0) & (local_t < logits.shape[-1])
        picked = torch.zeros_like(sum_exp)
        rows = mine.nonzero().squeeze(1)
        picked[rows] = shifted[rows, local_t[rows]]
        dist.all_reduce(picked, group=group)
        softmax = exp / sum_exp[:, None]
        ctx.save_for_backward(softmax, rows, local_t)
        return sum_exp.log() - picked

    @staticmethod
    def backward(ctx, grad):
        softmax, rows, local_t = ctx.saved_tensors
        g = softmax
        g[rows, local_t[rows]] -= 1.0
        return g * grad[:, None], None, None, None


def vocab_parallel_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Per-token loss `[n]` of `hidden [n, D]` through a row-sharded lm_head `weight` (DTensor `Shard(0)`)."""
    if not isinstance(weight, DTensor):
        logits = hidden @ weight.t()
        return torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")
    mesh = weight.device_mesh
    rows_per_rank = weight.shape[0] // mesh.size()
    start = mesh.get_local_rank() * rows_per_rank
    # DTensor matmul: Replicate [n, D] @ Shard(1) [D, V] -> Shard(1) logits. Its backward sums the hidden
    # states' partial gradients over the vocab shards (Partial -> Replicate) and keeps the weight sharded.
    h = (
        hidden
        if isinstance(hidden, DTensor)
        else DTensor.from_local(hidden, mesh, [Replicate()], run_check=False)
    )
    logits_local = (h @ weight.t()).to_local()
    return _VocabParallelCE.apply(logits_local, target, start, mesh.get_group())
