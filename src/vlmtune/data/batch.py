"""The packed micro-batch: samples concatenated into one row, targets already shifted, media alongside.

Positions restart per sample (each keeps its own MRoPE `position_ids`); attention stays within samples via
`cu_seqlens`, and the vision tower splits its attention per image / frame-pair from the grids. Targets are
the next-token labels, shifted once here: `targets[i] = labels[i + 1]`, IGNORE_INDEX where nothing is
trained (prompts, vision tokens, and each sample's last position, which would predict the next sample).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from vlmtune.constants import IGNORE_INDEX
from vlmtune.models.qwen3_vl import shift_labels

MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, L]
    targets: torch.Tensor  # [1, L] next-token targets, IGNORE_INDEX where not trained
    position_ids: torch.Tensor  # [3, 1, L]
    cu_seqlens: torch.Tensor  # [n + 1] int32 sample boundaries
    max_seqlen: int  # the longest sample, known on the host (FlashAttention varlen needs it without a sync)
    sample_ids: list[str] = field(default_factory=list)
    pixel_values: torch.Tensor | None = None  # [patches, C*T*P*P]
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    skipped: list = field(default_factory=list)  # BadSamples met while building it (reported by the loader)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_label_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def has_media(self) -> bool:
        return self.pixel_values is not None or self.pixel_values_videos is not None

    def media(self) -> dict[str, torch.Tensor]:
        """The pixel and grid tensors present, by the model's keyword names."""
        return {k: getattr(self, k) for k in MEDIA_KEYS if getattr(self, k) is not None}

    def model_inputs(self) -> dict:
        """Keyword arguments of `Qwen3VL.forward` for this packed row."""
        return dict(
            input_ids=self.input_ids,
            position_ids=self.position_ids,
            cu_seqlens=self.cu_seqlens,
            **self.media(),
        )

    def to(self, device, non_blocking: bool = True) -> PackedBatch:
        moved = {
            f.name: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return PackedBatch(**moved)


def pack(encoded: list[dict]) -> PackedBatch:
    """Concatenate samples from `Processor.encode` (input_ids, labels, position_ids, media) into one row."""
    if not encoded:
        raise ValueError("pack() needs at least one encoded sample")
    lengths = [int(e["input_ids"].numel()) for e in encoded]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    labels = torch.cat([e["labels"].reshape(-1) for e in encoded])[None]
    media = {}
    for key in MEDIA_KEYS:
        parts = [e[key] for e in encoded if e.get(key) is not None]
        if parts:
            media[key] = torch.cat(parts)
    return PackedBatch(
        input_ids=torch.cat([e["input_ids"].reshape(-1) for e in encoded])[None],
        targets=shift_labels(labels, cu),
        position_ids=torch.cat([e["position_ids"].reshape(3, -1) for e in encoded], dim=1)[:, None, :],
        cu_seqlens=cu,
        max_seqlen=max(lengths),
        sample_ids=[str(e.get("sample_id", i)) for i, e in enumerate(encoded)],
        **media,
    )
