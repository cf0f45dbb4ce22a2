"""The three loss modes, exact over gradient accumulation and data parallelism.

For one optimizer step over micro-batches `m` on data-parallel ranks `r` (l_t: token loss):
- token_mean:      sum_t l_t / N,  N = label tokens of the whole step (all micro-batches, all ranks)
- sample_mean:     (1/S) sum_s mean_{t in s} l_t,  S = samples of the step with at least one label token
- microbatch_mean: (1/(M*R)) sum_{m,r} mean_{t in m} l_t   (transformers' legacy gradient accumulation)
`step_normalizers` computes N, S and M*R before any backward so every micro-batch's loss is already divided
by the step's total; the gradients then sum to the gradient of the step's loss exactly. The cross-entropy
itself is `parallel/loss.py`'s chunked one (the lm_head never produces `[tokens, vocab]` logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmtune.constants import IGNORE_INDEX
from vlmtune.data.batch import PackedBatch
from vlmtune.parallel.collectives import all_reduce_host
from vlmtune.parallel.loss import chunked_token_losses

LOSS_TYPES = ("token_mean", "sample_mean", "microbatch_mean")


def sample_index(length: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """Which packed sample each position belongs to (`[L]`, all 0 without cu_seqlens)."""
    if cu_seqlens is None:
        return torch.zeros(length, dtype=torch.long, device=device)
    pos = torch.arange(length, device=device)
    return torch.searchsorted(cu_seqlens[1:].to(device).long(), pos, right=True)


@dataclass
class MicroBatchCounts:
    tokens: int  # label tokens (shifted targets that are trained)
    samples: int  # samples with at least one label token


def count_labels(batch: PackedBatch) -> MicroBatchCounts:
    """Counted on the host copy of the batch, before it moves to the device (no device sync)."""
    valid = batch.targets[0] != IGNORE_INDEX
    seg = sample_index(valid.shape[0], batch.cu_seqlens, valid.device)
    return MicroBatchCounts(tokens=int(valid.sum()), samples=int(torch.unique(seg[valid]).numel()))


@dataclass
class StepNormalizers:
    tokens: float  # N over all micro-batches and ranks
    samples: float  # S over all micro-batches and ranks
    microbatches: float  # M * R


def step_normalizers(counts: list[MicroBatchCounts], group=None) -> StepNormalizers:
    """Sum the step's label-token, sample and micro-batch counts over the data-parallel ranks (before any
    backward)."""
    t = all_reduce_host(
        [sum(c.tokens for c in counts), sum(c.samples for c in counts), len(counts)], group=group
    )
    return StepNormalizers(tokens=t[0], samples=t[1], microbatches=t[2])


def token_weights(
    batch: PackedBatch, counts: MicroBatchCounts, norm: StepNormalizers, loss_type: str
) -> torch.Tensor:
    """Weight of each position's token loss `[L]` (0 where the target is IGNORE_INDEX): the micro-batch's share
    of the step loss is `sum_t w_t * l_t` in every mode (the pipeline schedule uses these directly)."""
    target = batch.targets[0]
    valid = (target != IGNORE_INDEX).to(torch.float64)
    if loss_type == "token_mean":
        return valid / max(norm.tokens, 1.0)
    if loss_type == "microbatch_mean":
        return valid / max(counts.tokens, 1) / norm.microbatches
    if loss_type == "sample_mean":
        seg = sample_index(target.shape[0], batch.cu_seqlens, target.device)
        per_sample = torch.zeros(len(batch.cu_seqlens), dtype=torch.float64, device=target.device)
        per_sample = per_sample.index_add(0, seg, valid)
        return valid / per_sample.clamp(min=1)[seg] / max(norm.samples, 1.0)
    raise ValueError(f"loss.type must be one of {LOSS_TYPES}, got {loss_type!r}")


def microbatch_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    batch: PackedBatch,
    weights: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """This micro-batch's share of the step loss: `sum_t w_t * l_t` over its label positions (`weights`
    from `token_weights`, on the hidden states' device)."""
    target = batch.targets[0].to(hidden.device)
    valid = target != IGNORE_INDEX
    losses = chunked_token_losses(hidden[0][valid], weight, target[valid], chunk_size)
    return (losses * weights[valid].to(losses.dtype)).sum()


def aux_loss_weight(counts: MicroBatchCounts, norm: StepNormalizers, loss_type: str) -> float:
    """Weight of this micro-batch's MoE aux loss so the step's aux loss is averaged like the LM loss:
    by label-token share (token_mean), by sample share (sample_mean), or uniformly (microbatch_mean)."""
    if loss_type == "token_mean":
        return counts.tokens / max(norm.tokens, 1.0)
    if loss_type == "sample_mean":
        return counts.samples / max(norm.samples, 1.0)
    return 1.0 / norm.microbatches
