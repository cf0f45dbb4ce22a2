"""Qwen3-VL vision tower: patch embedding, interpolated learned positions, 2D-rotary ViT blocks, mergers.

Input is the processor's flattened patches `[N, C*T*P*P]` (N = sum of t*h*w over all images and videos,
patches in 2x2-merge block order) plus `grid_thw [n, 3]`. Output is the merged features `[N/4, D_text]` and
one DeepStack feature of the same shape per index in `deepstack_visual_indexes`.

Blocks live in a `ModuleDict` keyed by their global index; a pipeline stage holding part of the tower has
None for the modules it does not own (patch embedding, position table, mergers, DeepStack mergers of blocks
elsewhere) and continues the previous stage's hidden states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CoreAttention, build_mask, uses_varlen
from .config import VisionArgs
from .rope import apply_rotary, vision_rope_cos_sin


def _act(name: str):
    return nn.GELU(approximate="tanh") if name == "gelu_pytorch_tanh" else nn.GELU()


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d with stride == kernel is a Linear over flattened patches; we store it as one.

    `proj.weight` is `[D, C*T*P*P]`; the state-dict adapter reshapes the checkpoint's `[D, C, T, P, P]` on load and save.
    """

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.proj = nn.Linear(args.patch_dim, args.hidden_size, bias=True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches.to(self.proj.weight.dtype))


class VisionAttention(nn.Module):
    """Checkpoints fuse q/k/v into one `qkv` Linear; we keep three so tensor parallelism can shard each by heads
    (a row split of the fused weight would mix q, k and v). the state-dict adapter splits and fuses on load and save."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.hidden_size, bias=True)
        self.k_proj = nn.Linear(args.hidden_size, args.hidden_size, bias=True)
        self.v_proj = nn.Linear(args.hidden_size, args.hidden_size, bias=True)
        self.proj = nn.Linear(args.hidden_size, args.hidden_size, bias=True)
        self.core_attention = CoreAttention(causal=False)

    def forward(self, x, cos, sin, cu_seqlens, mask, max_seqlen=None):
        n = x.shape[0]
        q, k, v = (p(x).view(n, -1, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        # Rotary in fp32 as the reference does, then back to the activation dtype.
        q = apply_rotary(q.float(), cos[:, None], sin[:, None]).to(x.dtype)
        k = apply_rotary(k.float(), cos[:, None], sin[:, None]).to(x.dtype)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = self.core_attention(q, k, v, cu_seqlens=cu_seqlens, mask=mask, max_seqlen=max_seqlen)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.linear_fc1 = nn.Linear(args.hidden_size, args.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(args.intermediate_size, args.hidden_size, bias=True)
        self.act = _act(args.hidden_act)

    def forward(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.norm1 = nn.LayerNorm(args.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(args.hidden_size, eps=1e-6)
        self.attn = VisionAttention(args)
        self.mlp = VisionMLP(args)

    def forward(self, x, cos, sin, cu_seqlens, mask=None, max_seqlen=None):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, mask, max_seqlen)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """2x2 neighbouring patches -> one token of the text width. DeepStack mergers normalise after the shuffle."""

    def __init__(self, args: VisionArgs, postshuffle_norm: bool):
        super().__init__()
        self.merged = args.hidden_size * args.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged if postshuffle_norm else args.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged)
        self.act = nn.GELU()
        self.linear_fc2 = nn.Linear(self.merged, args.out_hidden_size)

    def forward(self, x):
        x = (
            self.norm(x.view(-1, self.merged))
            if self.postshuffle_norm
            else self.norm(x).view(-1, self.merged)
        )
        return self.linear_fc2(self.act(self.linear_fc1(x)))


def interpolation_taps(
    grids: list[list[int]], side: int, merge: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners) taps into the `side x side` position table for every patch of the host
    `grids` ([t, h, w] each): indices, weights `[N, 4]`."""
    idx, wts = [], []
    for t, h, w in grids:
        rows = _axis_taps(h, side, device)
        cols = _axis_taps(w, side, device)
        # [h, w, 4] tap tables over the raster grid, then reordered to 2x2-merge block order.
        i = (rows[0][:, None, :, None] * side + cols[0][None, :, None, :]).reshape(h, w, 4)
        wt = (rows[1][:, None, :, None] * cols[1][None, :, None, :]).reshape(h, w, 4)
        for tab, dst in ((i, idx), (wt, wts)):
            tab = tab.view(h // merge, merge, w // merge, merge, 4).transpose(1, 2).reshape(-1, 4)
            dst.append(tab.repeat(t, 1))
    return torch.cat(idx), torch.cat(wts)


def _axis_taps(size: int, side: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(size, dtype=torch.float32, device=device) * (side - 1) / max(size - 1, 1)
    lo = pos.floor()
    frac = pos - lo
    taps = torch.stack([lo, lo + 1], dim=-1).long().clamp(0, side - 1)
    return taps, torch.stack([1 - frac, frac], dim=-1)


def vision_segments(grids: list[list[int]], device) -> tuple[torch.Tensor, int]:
    """Attention segments from the host grids: every image, and every frame-pair of a video, attends only
    within itself. Returns (`cu_seqlens` int32 on `device`, the longest segment as a host int)."""
    lens = [h * w for t, h, w in grids for _ in range(t)]
    cu = F.pad(torch.tensor(lens, dtype=torch.int32, device="cpu").cumsum(0, dtype=torch.int32), (1, 0))
    return cu.to(device, non_blocking=True), max(lens)


class VisionTower(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embed = PatchEmbed(args)
        self.pos_embed = nn.Embedding(args.num_position_embeddings, args.hidden_size)
        self.blocks = nn.ModuleDict({str(i): VisionBlock(args) for i in range(args.depth)})
        self.merger = PatchMerger(args, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            [PatchMerger(args, postshuffle_norm=True) for _ in args.deepstack_visual_indexes]
        )

    def forward(self, x: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`x`: the patches `[N, C*T*P*P]`, or — on a pipeline stage without the patch embedding — the
        previous stage's hidden states `[N, D]`. Returns the merged features `[N/4, D_text]` (the hidden
        states `[N, D]` on a stage without the merger: the tower continues on the next stage) and the DeepStack
        features of the blocks this tower holds (`deepstack_slots()` says which)."""
        a = self.args
        # The grids are small host numbers (the trainer keeps them on the CPU; a device copy costs one sync
        # here): segments, taps, rotary angles and FlashAttention's max_seqlen come from them, so no vision
        # block waits for the GPU.
        grid_thw = grid_thw.cpu()
        grids = grid_thw.tolist()
        if self.patch_embed is not None:  # a later pipeline stage continues from hidden states
            side = int(round(a.num_position_embeddings**0.5))
            x = self.patch_embed(x)
            taps, weights = interpolation_taps(grids, side, a.spatial_merge_size, x.device)
            pos = (self.pos_embed(taps) * weights[..., None].to(self.pos_embed.weight.dtype)).sum(1)
            x = x + pos.to(x.dtype)
        cos, sin = vision_rope_cos_sin(grid_thw, a.head_dim, a.rope_theta, a.spatial_merge_size)
        cos, sin = cos.to(x.device, non_blocking=True), sin.to(x.device, non_blocking=True)
        cu_seqlens, max_seqlen = vision_segments(grids, x.device)
        mask = None
        if not uses_varlen(x):  # the block-diagonal mask only where FlashAttention does not run
            mask = build_mask(
                x.shape[0],
                x.shape[0],
                causal=False,
                attention_mask=None,
                cu_seqlens=cu_seqlens,
                device=x.device,
            )
        deepstack = []
        for i, block in self.blocks.items():
            x = block(x, cos, sin, cu_seqlens, mask, max_seqlen)
            if int(i) in a.deepstack_visual_indexes:
                j = a.deepstack_visual_indexes.index(int(i))
                deepstack.append(self.deepstack_merger_list[j](x))
        return (self.merger(x) if self.merger is not None else x), deepstack

    def deepstack_slots(self) -> list[int]:
        """DeepStack indexes produced by the blocks this tower holds, in the order `forward` returns them."""
        return [j for j, i in enumerate(self.args.deepstack_visual_indexes) if str(i) in self.blocks]

    def dummy_pass(self, device) -> torch.Tensor:
        """Sum of the tower's (and every DeepStack merger's) output on a 1 x merge x merge dummy grid.

        Data-parallel training adds 0 x this to the loss of a micro-batch without images or videos: under
        FSDP every rank must run the same sharded units forward and backward, or the ranks that saw images
        wait forever for the others. A pipeline stage's part of the tower takes dummy hidden states."""
        merge = self.args.spatial_merge_size
        first = self.patch_embed is not None
        weight = self.patch_embed.proj.weight if first else next(self.parameters())
        width = self.args.patch_dim if first else self.args.hidden_size
        x = torch.zeros(merge * merge, width, device=device, dtype=weight.dtype)
        feats, deepstack = self(x, torch.tensor([[1, merge, merge]], device="cpu"))
        return feats.float().sum() + sum(d.float().sum() for d in deepstack)
