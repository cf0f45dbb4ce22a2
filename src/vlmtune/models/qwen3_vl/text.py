"""Qwen3 text decoder with interleaved MRoPE and DeepStack injection.

Layers live in a `ModuleDict` keyed by their global index so a pipeline stage can delete the ones it does
not own and checkpoint keys stay `layers.<i>.*`; a stage without the embedding or the final norm holds None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CoreAttention
from .config import TextArgs
from .moe import SparseMoE


class RMSNorm(nn.Module):
    """Normalises in fp32, multiplies the weight in the input dtype (as the reference)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, args: TextArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = args.num_attention_heads
        self.n_kv = args.num_key_value_heads
        self.head_dim = args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.core_attention = CoreAttention(causal=True)

    def forward(
        self, x, cos, sin, *, attention_mask=None, cu_seqlens=None, mask=None, cache=None, max_seqlen=None
    ):
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, n, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos[:, None], sin[:, None]), rotate(k, cos[:, None], sin[:, None])
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = self.core_attention(
            q, k, v, attention_mask=attention_mask, cu_seqlens=cu_seqlens, mask=mask, max_seqlen=max_seqlen
        )
        return self.o_proj(out.reshape(b, n, -1))


class MLP(nn.Module):
    """SwiGLU."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def build_mlp(args: TextArgs, layer_idx: int) -> nn.Module:
    if args.is_sparse_layer(layer_idx):
        return SparseMoE(args)
    return MLP(args.hidden_size, args.intermediate_size)


class DecoderLayer(nn.Module):
    def __init__(self, args: TextArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = build_mlp(args, layer_idx)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, **attn_kwargs):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, **attn_kwargs)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextDecoder(nn.Module):
    def __init__(self, args: TextArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(args, i) for i in range(args.num_hidden_layers)})
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        visual_index: torch.Tensor | None = None,
        deepstack: list[torch.Tensor] | torch.Tensor | None = None,
        **attn_kwargs,
    ) -> torch.Tensor:
        """`h [B, L, D]` input embeddings -> hidden states of the layers this decoder holds, final-normed
        if it holds the norm (a pipeline stage may hold neither the embedding nor the norm).

        DeepStack feature `k` is added after decoder layer `k`: `deepstack[k]` is either the features at the
        flat visual positions `visual_index`, or (`visual_index` None) a dense `[B, L, D]` tensor, zero off
        those positions — a pipeline stage receives them dense.
        """
        for i, layer in self.layers.items():
            h = layer(h, cos, sin, **attn_kwargs)
            k = int(i)
            if deepstack is not None and k < len(deepstack):
                h = add_deepstack(h, deepstack[k], visual_index)
        return self.norm(h) if self.norm is not None else h


def add_deepstack(h: torch.Tensor, feature: torch.Tensor, visual_index: torch.Tensor | None) -> torch.Tensor:
    if visual_index is None:
        return h + feature.to(h.dtype)
    b, n, d = h.shape
    return h.reshape(b * n, d).index_add(0, visual_index, feature.to(h.dtype)).view(b, n, d)
