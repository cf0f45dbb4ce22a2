"""Context parallelism, the host side: one packed row cut into `cp` contiguous slices, the images and
frame-pairs dealt to the cp ranks for the vision tower, and the plan of the merged-feature exchange.

Every cp rank of a data shard holds the same micro-batch (the loader deals micro-batches per data shard), so
each computes the same plan from host numbers alone, with no communication and no device sync.

**Why contiguous slices, not zig-zag.** Ring attention gives each rank the queries of its own slice, so a
causal row needs the head-tail (zig-zag) split to even out the work. Ulysses does not: after the all-to-all
every rank attends over the *whole* row for `heads / cp` heads, so attention work is exactly `1/cp` per rank
whatever the split, and everything else (projections, MLP, norms) is per token, balanced by equal slice
lengths. A contiguous split keeps the gathered row in its original order (no permutation per layer).
`benchmarks/bench_cp.py` prints the per-rank work of both splits.

**Padding.** The row is padded to a multiple of `cp` with one extra sample (token 0, no targets, its own
positions and `cu_seqlens` entry): at most `cp - 1` tokens that attend only to themselves and train nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from vlmtune.constants import IGNORE_INDEX


@dataclass(frozen=True)
class VisionUnit:
    """An image, or one frame-pair of a video: vision attention never crosses one, so each can run on any rank."""

    patch_start: int  # first row in cat(pixel_values, pixel_values_videos)
    patches: int
    feature_start: int  # first merged feature, in the tower's output order (images, then videos)
    features: int
    grid: tuple[int, int, int]  # (1, h, w)


def vision_units(grids: list[list[int]], merge: int) -> list[VisionUnit]:
    """The units of `grids` ([t, h, w] each, images first, then videos), in the tower's order: a grid of `t`
    frame-pairs is `t` units of `(1, h, w)` (positions, rotary angles and the merger do not depend on t)."""
    units, patch, feature = [], 0, 0
    for t, h, w in grids:
        for _ in range(t):
            units.append(VisionUnit(patch, h * w, feature, h * w // merge**2, (1, h, w)))
            patch, feature = patch + h * w, feature + h * w // merge**2
    return units


def assign_units(units: list[VisionUnit], cp: int) -> list[int]:
    """The cp rank of each unit, balanced by patch count: largest first, each to the least-loaded rank (ties:
    the lower rank). A unit larger than a rank's share runs whole on one rank."""
    load, owner = [0] * cp, [0] * len(units)
    for i in sorted(range(len(units)), key=lambda i: (-units[i].patches, i)):
        rank = min(range(cp), key=lambda r: (load[r], r))
        owner[i], load[rank] = rank, load[rank] + units[i].patches
    return owner


@dataclass
class VisionExchange:
    """One rank's vision work for a row and its part of the merged-feature all-to-all."""

    send_order: torch.Tensor  # [features] long: this rank's merged features, reordered by destination rank
    send_splits: list[int]  # rows to each rank
    recv_splits: list[int]  # rows from each rank
    recv_positions: torch.Tensor  # [received] long: the slice positions of the received rows, in order


@dataclass
class RowShard:
    """One cp rank's slice of a packed row: what the model and the loss of that rank take."""

    input_ids: torch.Tensor  # [1, L/cp]
    targets: torch.Tensor  # [1, L/cp], shifted before the split: no neighbour token needed
    position_ids: torch.Tensor  # [3, 1, L/cp]
    cu_seqlens: torch.Tensor  # the whole padded row's sample boundaries (attention runs on the whole row)
    max_seqlen: int
    length: int  # L, the padded row
    real_tokens: int  # tokens before padding (the MoE router statistics skip padding)
    start: int  # this slice's first position in the row
    pixel_values: torch.Tensor | None = None  # the patches of this rank's vision units
    grid_thw: torch.Tensor | None = None  # their grids [units, 3], kept on the host
    exchange: VisionExchange | None = None  # None: no image or video in the row

    def to(self, device) -> RowShard:
        """Tensors on `device` (non-blocking), the grids left on the host (the tower reads them as numbers)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("input_ids", "targets", "position_ids", "cu_seqlens", "pixel_values"):
            if moved[name] is not None:
                moved[name] = moved[name].to(device, non_blocking=True)
        return RowShard(**moved)


def padded_length(length: int, cp: int) -> int:
    return -(-length // cp) * cp


def _pad_row(batch, length: int):
    """(input_ids, targets, position_ids, cu_seqlens, max_seqlen) of `batch` padded to `length` tokens."""
    pad = length - batch.input_ids.shape[1]
    if pad == 0:
        return batch.input_ids, batch.targets, batch.position_ids, batch.cu_seqlens, batch.max_seqlen
    ids = torch.cat([batch.input_ids, batch.input_ids.new_zeros(1, pad)], 1)
    targets = torch.cat([batch.targets, batch.targets.new_full((1, pad), IGNORE_INDEX)], 1)
    positions = torch.arange(pad, dtype=batch.position_ids.dtype).expand(3, 1, pad)
    positions = torch.cat([batch.position_ids, positions], 2)
    cu = torch.cat([batch.cu_seqlens, batch.cu_seqlens.new_tensor([length])])
    return ids, targets, positions, cu, max(batch.max_seqlen, pad)


def shard_row(batch, weights: torch.Tensor, *, cp: int, rank: int, args) -> tuple[RowShard, torch.Tensor]:
    """Rank `rank`'s slice of the packed row `batch` (a `PackedBatch`, on the host) and of its per-position
    loss `weights [L]` (computed on the whole row: every loss mode stays exact). `args`: the ModelArgs."""
    real = batch.input_ids.shape[1]
    length = padded_length(real, cp)
    chunk = length // cp
    ids, targets, positions, cu, max_seqlen = _pad_row(batch, length)
    mine = slice(rank * chunk, (rank + 1) * chunk)
    w = torch.cat([weights, weights.new_zeros(length - real)])[mine]
    shard = RowShard(
        input_ids=ids[:, mine], targets=targets[:, mine], position_ids=positions[:, :, mine],
        cu_seqlens=cu, max_seqlen=max_seqlen, length=length, real_tokens=real, start=rank * chunk,
    )  # fmt: skip
    grids = [g for g in (batch.image_grid_thw, batch.video_grid_thw) if g is not None]
    if not grids:
        return shard, w
    units = vision_units(torch.cat(grids).tolist(), args.vision.spatial_merge_size)
    owner = assign_units(units, cp)
    index = visual_positions(batch, args)
    if sum(u.features for u in units) != index.numel():
        raise ValueError(
            f"{index.numel()} vision placeholder tokens but {sum(u.features for u in units)} features"
        )
    own = [u for u, r in zip(units, owner) if r == rank]
    if own:
        pixels = torch.cat([p for p in (batch.pixel_values, batch.pixel_values_videos) if p is not None])
        shard.pixel_values = torch.cat([pixels[u.patch_start : u.patch_start + u.patches] for u in own])
        shard.grid_thw = torch.tensor([u.grid for u in own])
    shard.exchange = plan_exchange(units, owner, index, cp=cp, rank=rank, chunk=chunk)
    return shard, w


def visual_positions(batch, args) -> torch.Tensor:
    """Row positions of the vision placeholder tokens in the tower's feature order (images, then videos),
    checked against the grids as `Qwen3VL.encode_vision` does."""
    ids = batch.input_ids[0]
    merge = args.vision.spatial_merge_size
    out = []
    for kind, token, grid in (
        ("image", args.image_token_id, batch.image_grid_thw),
        ("video", args.video_token_id, batch.video_grid_thw),
    ):
        idx = (ids == token).nonzero().squeeze(1)
        count = int(grid.prod(-1).sum()) // merge**2 if grid is not None else 0
        if idx.numel() != count:
            raise ValueError(
                f"{kind} placeholder tokens ({idx.numel()}) do not match the {kind} features ({count}) "
                f"from {kind}_grid_thw={None if grid is None else grid.tolist()}"
            )
        out.append(idx)
    return torch.cat(out)


def plan_exchange(
    units: list[VisionUnit], owner: list[int], index: torch.Tensor, *, cp: int, rank: int, chunk: int
) -> VisionExchange:
    """Who sends which merged features where: feature k goes to the rank whose slice holds position
    `index[k]`. Every rank's sends are replayed here (host work), so the receiver knows where each received
    row belongs; rows arrive grouped by source rank, each group in its sender's `send_order`."""
    dest = torch.div(index, chunk, rounding_mode="floor")
    send_order, recv_positions, recv_splits, send_splits = None, [], [], []
    for src in range(cp):
        feats = [
            torch.arange(u.feature_start, u.feature_start + u.features)
            for u, r in zip(units, owner)
            if r == src
        ]
        local = torch.cat(feats) if feats else torch.zeros(0, dtype=torch.long)
        order = torch.sort(dest[local], stable=True).indices
        sent = local[order]
        to_me = dest[sent] == rank
        recv_positions.append(index[sent][to_me] - rank * chunk)
        recv_splits.append(int(to_me.sum()))
        if src == rank:
            send_order = order
            send_splits = torch.bincount(dest[local], minlength=cp).tolist()
    return VisionExchange(send_order, send_splits, recv_splits, torch.cat(recv_positions))
