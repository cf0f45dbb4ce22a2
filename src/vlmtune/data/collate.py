"""Pack encoded samples into one row: `input_ids [1, L]` with `cu_seqlens` marking sample boundaries.

Positions restart per sample (each sample keeps its own `position_ids`); the decoder attends within
samples via `cu_seqlens`, and the vision tower splits its attention per frame-pair from the grids.
"""

from __future__ import annotations

import torch

IGNORE = -100
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def pack(encoded: list[dict]) -> dict:
    """Concatenate samples from `Processor.encode` into a packed micro-batch.

    The first label of every sample is set to -100: after the loss's shift it would be predicted from the
    previous sample's last token. `num_label_tokens` counts the targets that remain after that shift.
    """
    if not encoded:
        raise ValueError("pack() needs at least one encoded sample")
    lengths = [int(e["input_ids"].numel()) for e in encoded]
    labels = torch.cat([e["labels"] for e in encoded]).clone()
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    labels[cu[:-1].long()] = IGNORE
    batch = {
        "input_ids": torch.cat([e["input_ids"] for e in encoded])[None],
        "labels": labels[None],
        "position_ids": torch.cat([e["position_ids"] for e in encoded], dim=1)[:, None, :],
        "cu_seqlens": cu,
    }
    for key in VISION_KEYS:
        parts = [e[key] for e in encoded if key in e]
        if parts:
            batch[key] = torch.cat(parts)
    batch["sample_ids"] = [e.get("sample_id", str(i)) for i, e in enumerate(encoded)]
    batch["num_label_tokens"] = int((labels[1:] != IGNORE).sum())
    return batch
