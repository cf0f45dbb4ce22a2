"""The one attention entry point for the vision tower and the decoder.

It serves three layouts with the same call:
- a padded batch: `attention_mask [B, S]` marks real keys (1) and padding (0);
- a packed row (`B == 1`): `cu_seqlens [n + 1]` separates samples (or images / frame-pairs in the vision
  tower), attention never crosses a boundary;
- cached decoding: `q` holds the last `Lq` positions of `S` keys (causal offset `S - Lq`).

CPU and any non-half dtype use `scaled_dot_product_attention` with an explicit boolean mask. On CUDA with
bf16/fp16, packed rows go to FlashAttention through `torch.nn.attention.varlen.varlen_attn`, which takes the
longest segment as a host integer: callers pass `max_seqlen` (computed once per micro-batch on the host, at
packing time for text and from `grid_thw` for the vision tower), so an attention call never waits for the
GPU. Callers check `uses_varlen(x)` first so that no `[L, L]` mask is built where FlashAttention runs.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F
from torch import nn

try:  # torch >= 2.9 (keyword arguments differ between releases: see `_varlen`)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch falls back to SDPA with a mask
    varlen_attn = None

log = logging.getLogger(__name__)
_VARLEN_ARGS = set(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else set()


def uses_varlen(x: torch.Tensor) -> bool:
    """Whether packed rows of activations like `x` run FlashAttention varlen (CUDA, bf16/fp16): then no
    `[L, L]` mask may be built for them."""
    return varlen_attn is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


@functools.cache
def _warn_once_max_seqlen() -> None:
    log.warning(
        "packed attention without max_seqlen: reading it from cu_seqlens waits for the GPU in every layer; "
        "pass max_seqlen (PackedBatch.max_seqlen) down to attention()"
    )


def _varlen(q, k, v, cu: torch.Tensor, max_seqlen: int, causal: bool) -> torch.Tensor:
    """`varlen_attn` on `[T, H, D]` tensors across torch releases: 2.9 takes `is_causal` and equal head
    counts; 2.10 takes `window_size`; 2.12 adds `enable_gqa`. Without it, k/v heads are repeated."""
    kw = {}
    if "window_size" in _VARLEN_ARGS:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kw["is_causal"] = causal
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in _VARLEN_ARGS:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kw)


def build_mask(
    lq: int,
    s: int,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean `[B or 1, 1, Lq, S]` mask (True = attend), or None when plain causal/full attention suffices."""
    if attention_mask is None and cu_seqlens is None:
        return None if (not causal or lq == s) else _causal(lq, s, device)[None, None]
    mask = torch.ones(lq, s, dtype=torch.bool, device=device)
    if causal:
        mask = _causal(lq, s, device)
    if cu_seqlens is not None:
        seg = torch.bucketize(torch.arange(s, device=device), cu_seqlens[1:].to(device), right=True)
        mask = mask & (seg[s - lq :, None] == seg[None, :])
    mask = mask[None, None]
    if attention_mask is not None:
        keep = attention_mask.to(device=device, dtype=torch.bool)
        mask = mask & keep[:, None, None, :]
        # A padded query row would attend to nothing (NaN in SDPA); let it see itself. Its output is
        # ignored by every consumer (labels and logits at padding are never used).
        diag = torch.zeros(lq, s, dtype=torch.bool, device=device)
        diag[torch.arange(lq), torch.arange(s - lq, s)] = True
        mask = mask | (diag[None, None] & ~keep[:, None, s - lq :, None])
    return mask


def _causal(lq: int, s: int, device) -> torch.Tensor:
    return torch.ones(lq, s, dtype=torch.bool, device=device).tril(diagonal=s - lq)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """q `[B, Hq, Lq, D]`, k/v `[B, Hkv, S, D]` (Hq a multiple of Hkv) -> `[B, Lq, Hq, D]`.

    `mask` may be passed prebuilt (`build_mask`) so a model builds it once for all layers. A packed row on
    the FlashAttention path takes `max_seqlen`, the longest segment of `cu_seqlens` as a host integer;
    without it each call reads it from the device (a sync, with a warning the first time).
    """
    bsz, hq, lq, d = q.shape
    s = k.shape[2]
    if uses_varlen(q) and cu_seqlens is not None and attention_mask is None and lq == s and bsz == 1:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32, non_blocking=True)
        if max_seqlen is None:  # callers pass it (PackedBatch.max_seqlen); reading it here syncs every call
            _warn_once_max_seqlen()
            max_seqlen = int((cu[1:] - cu[:-1]).max())
        out = _varlen(*(t[0].transpose(0, 1) for t in (q, k, v)), cu, max_seqlen, causal)
        return out.unsqueeze(0)
    if mask is None:
        mask = build_mask(
            lq, s, causal=causal, attention_mask=attention_mask, cu_seqlens=cu_seqlens, device=q.device
        )
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=causal and mask is None and lq == s,
        enable_gqa=hq != k.shape[1],
    )
    return out.transpose(1, 2)


class CoreAttention(nn.Module):
    """`attention` as a parameter-free module, so it can be wrapped from outside: activation checkpointing's
    `selective` mode recomputes just this (Megatron's core-attention recompute), context parallelism puts its
    all-to-alls around it."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(
        self, q, k, v, *, attention_mask=None, cu_seqlens=None, mask=None, max_seqlen=None
    ) -> torch.Tensor:
        return attention(
            q, k, v, causal=self.causal, attention_mask=attention_mask, cu_seqlens=cu_seqlens, mask=mask,
            max_seqlen=max_seqlen,
        )  # fmt: skip
