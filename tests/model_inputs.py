"""Hand-built Qwen3-VL inputs for model tests: token ids with expanded vision blocks plus random patches."""

from __future__ import annotations

import torch

IMAGE, VIDEO, START, END = 151655, 151656, 151652, 151653
PATCH_DIM = 3 * 2 * 16 * 16


def build_sample(segments, seed: int = 0) -> dict:
    """`segments`: ints (that many random text tokens), ("image", h, w) or ("video", t, h, w) in patch units.

    A video gets one `<timestamp text> <|vision_start|> pads <|vision_end|>` block per frame-pair, as Qwen3-VL's
    processor lays it out. Returns input_ids [1, L], mm_token_type_ids, pixel/grid tensors (None when absent).
    """
    g = torch.Generator().manual_seed(seed)
    ids, types = [], []
    images, image_grids, videos, video_grids = [], [], [], []
    for seg in segments:
        if isinstance(seg, int):
            ids += torch.randint(0, 150000, (seg,), generator=g).tolist()
            types += [0] * seg
        elif seg[0] == "image":
            _, h, w = seg
            n = h * w // 4
            ids += [START] + [IMAGE] * n + [END]
            types += [0] + [1] * n + [0]
            images.append(torch.randn(h * w, PATCH_DIM, generator=g))
            image_grids.append([1, h, w])
        else:
            _, t, h, w = seg
            n = h * w // 4
            for _ in range(t):
                stamp = torch.randint(0, 150000, (3,), generator=g).tolist()  # "<x.y seconds>"
                ids += stamp + [START] + [VIDEO] * n + [END]
                types += [0, 0, 0, 0] + [2] * n + [0]
            videos.append(torch.randn(t * h * w, PATCH_DIM, generator=g))
            video_grids.append([t, h, w])
    return {
        "input_ids": torch.tensor([ids]),
        "mm_token_type_ids": torch.tensor([types]),
        "pixel_values": torch.cat(images) if images else None,
        "image_grid_thw": torch.tensor(image_grids) if images else None,
        "pixel_values_videos": torch.cat(videos) if videos else None,
        "video_grid_thw": torch.tensor(video_grids) if videos else None,
    }


def pad_batch(samples: list[dict], side: str) -> dict:
    """Pad single-row samples into one batch (pad id 0) on the `side` ('left'|'right'); media concatenated."""
    length = max(s["input_ids"].shape[1] for s in samples)
    ids, types, mask = [], [], []
    for s in samples:
        n = s["input_ids"].shape[1]
        pad = torch.zeros(1, length - n, dtype=torch.long)
        cat = (lambda a, b: torch.cat([b, a], 1)) if side == "left" else (lambda a, b: torch.cat([a, b], 1))
        ids.append(cat(s["input_ids"], pad))
        types.append(cat(s["mm_token_type_ids"], pad))
        mask.append(cat(torch.ones(1, n, dtype=torch.long), pad))
    out = {
        "input_ids": torch.cat(ids),
        "mm_token_type_ids": torch.cat(types),
        "attention_mask": torch.cat(mask),
    }
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [s[key] for s in samples if s[key] is not None]
        out[key] = torch.cat(parts) if parts else None
    return out


def ours_kwargs(inputs: dict) -> dict:
    """Our forward takes no mm_token_type_ids: vision positions come from the token ids."""
    return {k: v for k, v in inputs.items() if k != "mm_token_type_ids" and v is not None}


def hf_kwargs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if v is not None}


def packed_row(samples: list[dict]) -> dict:
    """Samples (from `build_sample`) packed in one row: per-sample MRoPE positions, `cu_seqlens`, media in
    sample order, labels = input ids (the model's forward keywords; no mm_token_type_ids)."""
    from vlmtune.models.qwen3_vl import get_rope_index

    positions = [
        get_rope_index(
            s["input_ids"],
            s["image_grid_thw"],
            s["video_grid_thw"],
            image_token_id=IMAGE,
            video_token_id=VIDEO,
        )[0]
        for s in samples
    ]
    lens = torch.tensor([s["input_ids"].shape[1] for s in samples])
    ids = torch.cat([s["input_ids"] for s in samples], 1)
    row = {
        "input_ids": ids,
        "labels": ids.clone(),
        "position_ids": torch.cat(positions, dim=2),
        "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).int()]),
    }
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [s[key] for s in samples if s[key] is not None]
        if parts:
            row[key] = torch.cat(parts)
    return row


def as_packed_batch(row: dict):
    """A `packed_row` dict as the trainer's PackedBatch (targets shifted once, per sample)."""
    from vlmtune.data import PackedBatch
    from vlmtune.models.qwen3_vl import shift_labels

    cu = row["cu_seqlens"]
    media = {
        k: row[k]
        for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
        if k in row
    }
    return PackedBatch(
        input_ids=row["input_ids"],
        targets=shift_labels(row["labels"], cu),
        position_ids=row["position_ids"],
        cu_seqlens=cu,
        max_seqlen=int((cu[1:] - cu[:-1]).max()),
        **media,
    )
