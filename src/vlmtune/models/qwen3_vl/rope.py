"""Rotary embeddings for Qwen3-VL: 3D multimodal positions (MRoPE) for the decoder, 2D for the vision tower.

Decoder positions are a `[3, B, L]` tensor (temporal, height, width). Text tokens carry the same value on
all three axes; a vision block of `h x w` merged tokens starting at position `p` gets `t = p`, `h = p + row`,
`w = p + col`, and the text after it continues at `p + max(h, w)`. Videos are split into frame-pairs
(each preceded by its timestamp text), so every frame-pair is its own `1 x h x w` block.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def _grid_iter(grid_thw: torch.Tensor | None, split_time: bool) -> Iterator[tuple[int, int, int]]:
    if grid_thw is None:
        return iter(())
    rows = []
    for t, h, w in grid_thw.tolist():
        rows.extend([(1, h, w)] * t if split_time else [(t, h, w)])
    return iter(rows)


def sample_positions(
    input_ids: torch.Tensor,
    images: Iterator[tuple[int, int, int]],
    videos: Iterator[tuple[int, int, int]],
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
) -> torch.Tensor:
    """3D positions `[3, L]` of one unpadded sample; consumes one grid per vision block from the iterators."""
    ids = input_ids.tolist()
    n = len(ids)
    out = torch.empty(3, n, dtype=torch.long)
    pos, i = 0, 0
    while i < n:
        tok = ids[i]
        if tok != image_token_id and tok != video_token_id:
            j = i
            while j < n and ids[j] != image_token_id and ids[j] != video_token_id:
                j += 1
            out[:, i:j] = torch.arange(pos, pos + j - i)
            pos += j - i
            i = j
            continue
        grids, kind = (images, "image") if tok == image_token_id else (videos, "video")
        try:
            t, h, w = next(grids)
        except StopIteration:
            raise ValueError(f"more {kind} placeholder blocks than {kind} grids (at token {i})") from None
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        count = t * gh * gw
        if i + count > n or any(x != tok for x in ids[i : i + count]):
            raise ValueError(
                f"{kind} block at token {i} is shorter than its grid ({t}x{h}x{w} -> {count} tokens)"
            )
        tt = torch.arange(t).view(-1, 1, 1).expand(t, gh, gw)
        hh = torch.arange(gh).view(1, -1, 1).expand(t, gh, gw)
        ww = torch.arange(gw).view(1, 1, -1).expand(t, gh, gw)
        out[:, i : i + count] = torch.stack([tt, hh, ww]).reshape(3, -1) + pos
        pos += max(gh, gw)
        i += count
    return out


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions `[3, B, L]` and rope deltas `[B, 1]` for a padded batch, as transformers' `get_rope_index`.

    Grids are consumed in batch order (row 0's images first). Padding positions get 0. The delta is
    `max(position) + 1 - number_of_tokens`, the offset decode steps add to plain text positions.
    """
    bsz, seqlen = input_ids.shape
    positions = torch.zeros(3, bsz, seqlen, dtype=torch.long)
    deltas = torch.zeros(bsz, 1, dtype=torch.long)
    images = _grid_iter(image_grid_thw, split_time=False)
    videos = _grid_iter(video_grid_thw, split_time=True)
    for b in range(bsz):
        keep = (
            attention_mask[b].bool().cpu()
            if attention_mask is not None
            else torch.ones(seqlen, dtype=torch.bool)
        )
        ids = input_ids[b].cpu()[keep]
        if ids.numel() == 0:
            continue
        pos = sample_positions(
            ids,
            images,
            videos,
            image_token_id=image_token_id,
            video_token_id=video_token_id,
            spatial_merge_size=spatial_merge_size,
        )
        positions[:, b, keep] = pos
        deltas[b, 0] = pos.max() + 1 - ids.numel()
    for kind, it in (("image", images), ("video", videos)):
        if next(it, None) is not None:
            raise ValueError(f"more {kind} grids than {kind} placeholder blocks in input_ids")
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def text_rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[B, L, head_dim]` for `[3, B, L]` positions with interleaved MRoPE.

    Frequency slot `i` takes its angle from the height axis when `i % 3 == 1` and `i < 3*section[1]`,
    from the width axis when `i % 3 == 2` and `i < 3*section[2]`, and from time otherwise.
    """
    device = position_ids.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # [3, B, L, D/2]
    axis = torch.zeros(head_dim // 2, dtype=torch.long, device=device)
    for a in (1, 2):
        axis[a : 3 * mrope_section[a] : 3] = a
    freqs = freqs.gather(0, axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])).squeeze(0)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def vision_rope_cos_sin(
    grid_thw: torch.Tensor, head_dim: int, theta: float, spatial_merge_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin `[N, head_dim]` for all patches of all grids, in 2x2-merge block order."""
    device = grid_thw.device
    quarter = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float, device=device) / quarter))
    rows = []
    m = spatial_merge_size
    for t, h, w in grid_thw.tolist():
        hh = torch.arange(h, device=device).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
        ww = torch.arange(w, device=device).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
        hw = torch.stack([hh.transpose(1, 2).flatten(), ww.transpose(1, 2).flatten()], dim=-1)
        rows.append(hw.repeat(t, 1))
    pos = torch.cat(rows)  # [N, 2]
    freqs = (pos[..., None].float() * inv_freq).flatten(1)  # [N, head_dim/2]: h freqs then w freqs
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin
