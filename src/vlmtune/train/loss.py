"""Chunked cross-entropy and the three loss modes.

The lm_head is applied to the label positions only, `chunk_size` tokens at a time, each chunk under
activation checkpointing, so neither forward nor backward ever holds the `[tokens, vocab]` logits.

Loss modes, for one optimizer step over micro-batches `m` on data-parallel ranks `r` (l_t: token loss):
- token_mean:      sum_t l_t / N,  N = label tokens of the whole step (all micro-batches, all ranks)
- sample_mean:     (1/S) sum_s mean_{t in s} l_t,  S = samples of the step with at least one label token
- microbatch_mean: (1/(M*R)) sum_{m,r} mean_{t in m} l_t   (transformers' legacy gradient accumulation)
`step_normalizers` computes N, S and M*R before any backward so every micro-batch's loss is already
divided by the step's total; the gradients then sum to the gradient of the step's loss exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from vlmtune.models.qwen3_vl.model import shift_labels
from vlmtune.parallel.tensor import vocab_parallel_cross_entropy

LOSS_TYPES = ("token_mean", "sample_mean", "microbatch_mean")


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if isinstance(weight, DTensor):  # tensor parallel lm_head: vocabulary rows sharded over tp
        return vocab_parallel_cross_entropy(hidden, weight, target)
    logits = hidden @ weight.t()
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()  # the softmax in fp32, as the reference does
    return F.cross_entropy(logits, target, reduction="none")


def chunked_token_losses(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Per-token cross-entropy `[n]` of `hidden [n, D]` against `target [n]` through `weight [V, D]`."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], target[start : start + chunk_size]
        # Recompute the chunk's logits in backward instead of keeping them.
        if torch.is_grad_enabled():
            out.append(checkpoint(_chunk_ce, h, weight, t, use_reentrant=False))
        else:
            out.append(_chunk_ce(h, weight, t))
    return torch.cat(out)


def sample_index(length: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """Which packed sample each position belongs to (`[L]`, all 0 without cu_seqlens)."""
    if cu_seqlens is None:
        return torch.zeros(length, dtype=torch.long, device=device)
    pos = torch.arange(length, device=device)
    return torch.searchsorted(cu_seqlens[1:].to(device).long(), pos, right=True)


@dataclass
class MicroBatchCounts:
    tokens: int  # label tokens after the shift
    samples: int  # samples with at least one label token


def count_labels(batch: dict) -> MicroBatchCounts:
    labels = batch["labels"]
    if labels.ndim != 2 or labels.shape[0] != 1:
        raise ValueError(f"training micro-batches are packed rows: labels [1, L], got {tuple(labels.shape)}")
    valid = shift_labels(labels, batch.get("cu_seqlens"))[0] != -100
    seg = sample_index(valid.shape[0], batch.get("cu_seqlens"), valid.device)
    samples = int(torch.unique(seg[valid]).numel())
    return MicroBatchCounts(tokens=int(valid.sum()), samples=samples)


@dataclass
class StepNormalizers:
    tokens: float  # N over all micro-batches and ranks
    samples: float  # S over all micro-batches and ranks
    microbatches: float  # M * R


def step_normalizers(counts: list[MicroBatchCounts], group=None) -> StepNormalizers:
    """All-reduce the step's label-token, sample and micro-batch counts (before any backward)."""
    t = torch.tensor(
        [sum(c.tokens for c in counts), sum(c.samples for c in counts), len(counts)], dtype=torch.float64
    )
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
    return StepNormalizers(tokens=float(t[0]), samples=float(t[1]), microbatches=float(t[2]))


def token_weights(
    batch: dict, counts: MicroBatchCounts, norm: StepNormalizers, loss_type: str
) -> torch.Tensor:
    """Weight of each position's token loss `[L]` (0 where the shifted label is -100): the micro-batch's
    share of the step loss is `sum_t w_t * l_t` in every mode (the pipeline schedule uses these directly)."""
    target = shift_labels(batch["labels"], batch.get("cu_seqlens"))[0]
    valid = (target != -100).to(torch.float64)
    if loss_type == "token_mean":
        return valid / max(norm.tokens, 1.0)
    if loss_type == "microbatch_mean":
        return valid / max(counts.tokens, 1) / norm.microbatches
    if loss_type == "sample_mean":
        seg = sample_index(target.shape[0], batch.get("cu_seqlens"), target.device)
        per_sample = torch.zeros(int(seg.max()) + 1, dtype=torch.float64).index_add(0, seg.cpu(), valid.cpu())
        return valid / per_sample.clamp(min=1)[seg.cpu()].to(valid.device) / max(norm.samples, 1.0)
    raise ValueError(f"loss.type must be one of {LOSS_TYPES}, got {loss_type!r}")


def microbatch_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    batch: dict,
    counts: MicroBatchCounts,
    norm: StepNormalizers,
    loss_type: str,
    chunk_size: int,
) -> torch.Tensor:
    """This micro-batch's share of the step loss (summing the shares over the step gives the step loss)."""
    target = shift_labels(batch["labels"], batch.get("cu_seqlens"))[0].to(hidden.device)
    valid = target != -100
    losses = chunked_token_losses(hidden[0][valid], weight, target[valid], chunk_size)
    w = token_weights(batch, counts, norm, loss_type).to(hidden.device)[valid]
    return (losses * w.to(losses.dtype)).sum()


def aux_loss_weight(counts: MicroBatchCounts, norm: StepNormalizers, loss_type: str) -> float:
    """Weight of this micro-batch's MoE aux loss so the step's aux loss is averaged like the LM loss:
    by label-token share (token_mean), by sample share (sample_mean), or uniformly (microbatch_mean)."""
    if loss_type == "token_mean":
        return counts.tokens / max(norm.tokens, 1.0)
    if loss_type == "sample_mean":
        return counts.samples / max(norm.samples, 1.0)
    return 1.0 / norm.microbatches
