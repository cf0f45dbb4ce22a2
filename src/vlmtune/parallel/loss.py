"""Cross-entropy through the lm_head without ever holding `[tokens, vocab]` logits: label positions only,
`chunk_size` rows at a time, each chunk recomputed in backward. A tensor-parallel lm_head (vocabulary rows
sharded, a DTensor) goes through the vocabulary-parallel cross-entropy. Used by the trainer's loss and by the
last pipeline stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from vlmtune.constants import IGNORE_INDEX

from .tensor import vocab_parallel_cross_entropy


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
    """Per-token cross-entropy `[n]` (fp32) of `hidden [n, D]` against `target [n]` through `weight [V, D]`.

    With no tokens (`n == 0`: e.g. a context-parallel slice without labels) one empty chunk still runs, so
    the (empty) result stays in the graph of `hidden` and `weight`: every rank then runs the same backward
    (FSDP's reduce-scatter of the lm_head, the collectives of the layers below)."""
    out = []
    for start in range(0, max(hidden.shape[0], 1), chunk_size):
        h, t = hidden[start : start + chunk_size], target[start : start + chunk_size]
        if torch.is_grad_enabled():  # recompute the chunk's logits in backward instead of keeping them
            out.append(checkpoint(_chunk_ce, h, weight, t, use_reentrant=False))
        else:
            out.append(_chunk_ce(h, weight, t))
    return torch.cat(out)


def position_losses(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Per-position cross-entropy `[L]` of `hidden [L, D]`, 0 where `target` is IGNORE_INDEX."""
    keep = target != IGNORE_INDEX
    out = hidden.new_zeros(target.shape[0], dtype=torch.float32)
    return out.masked_scatter(keep, chunked_token_losses(hidden[keep], weight, target[keep], chunk))
