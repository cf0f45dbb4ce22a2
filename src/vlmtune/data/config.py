"""All data options in one validated dataclass (the `data:` section of a training config).

Media options left as `None` take the checkpoint's `preprocessor_config.json` /
`video_preprocessor_config.json` values (see `media.MediaOptions.from_checkpoint`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class DataConfigError(ValueError):
    """A data option that is unknown or out of range; the message names it."""


# Keys of DataConfig that `build_processor` takes (media + encoding options).
PROCESSOR_KEYS = (
    "image_min_pixels",
    "image_max_pixels",
    "video_fps",
    "video_min_frames",
    "video_max_frames",
    "video_min_pixels",
    "video_max_pixels",
    "max_aspect_ratio",
    "image_min_side",
    "max_source_pixels",
    "cutoff_len",
    "train_on_prompt",
    "mask_history",
    "system_prompt",
    "enable_thinking",
    "restrict_media_to_dataset_dir",
)


@dataclass
class DataConfig:
    # Datasets: comma-separated JSON / JSONL files in the messages or LLaVA format.
    dataset: str | list[str] = ""
    dataset_dir: str = (
        "."  # base for relative media paths (and relative dataset paths that do not exist as given)
    )
    max_samples: int | None = None  # per dataset, first N after reading
    mix_ratios: list[float] | None = None  # per dataset: 0.5 keeps a seeded half, 2.0 repeats it twice
    shuffle: bool = True
    seed: int = 42
    val_ratio: float = 0.0  # seeded fraction of the training samples held out for validation
    val_dataset: str | list[str] | None = None  # separate validation files instead of (or with) val_ratio
    cache_dir: str | None = None  # where the length index is cached; None: no cache
    # Media (None: the checkpoint's preprocessor configs).
    image_min_pixels: int | None = None
    image_max_pixels: int | None = None
    video_fps: float | None = None
    video_min_frames: int | None = None
    video_max_frames: int | None = None
    video_min_pixels: int | None = None  # over all sampled frames together
    video_max_pixels: int | None = None  # over all sampled frames together
    max_aspect_ratio: float = 200.0
    image_min_side: int = 4  # images with a side below this many pixels are bad samples
    max_source_pixels: int = 178_956_970  # decompression-bomb guard on the decoded size (PIL's default)
    # Encoding.
    cutoff_len: int = 8192
    train_on_prompt: bool = False
    mask_history: bool = False
    system_prompt: str | None = None
    enable_thinking: bool | None = None
    # Bad input.
    on_bad_sample: str = "skip"
    restrict_media_to_dataset_dir: bool = False
    # Loading.
    max_tokens: int = 8192  # per micro-batch token budget when build_loader is not given one
    num_workers: int = 2
    prefetch_factor: int = 2

    def __post_init__(self):
        self.dataset = split_list(self.dataset)
        self.val_dataset = split_list(self.val_dataset) if self.val_dataset else []
        self.validate()

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "data") -> DataConfig:
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataConfigError(
                f"{where}: unknown option(s) {unknown}; valid options are: {', '.join(sorted(known))}"
            )
        return cls(**d)

    def validate(self) -> None:
        def bad(name, why):
            raise DataConfigError(f"data.{name} = {getattr(self, name)!r}: {why}")

        if self.on_bad_sample not in ("skip", "error"):
            bad("on_bad_sample", "must be 'skip' or 'error'")
        if not 0.0 <= self.val_ratio < 1.0:
            bad("val_ratio", "must be in [0, 1)")
        if self.max_samples is not None and self.max_samples <= 0:
            bad("max_samples", "must be a positive integer or null")
        if self.mix_ratios is not None:
            if len(self.mix_ratios) != len(self.dataset):
                bad("mix_ratios", f"needs one ratio per dataset ({len(self.dataset)} datasets)")
            if any(r <= 0 for r in self.mix_ratios):
                bad("mix_ratios", "ratios must be > 0")
        for name in ("image_min_pixels", "image_max_pixels", "video_min_pixels", "video_max_pixels"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                bad(name, "must be > 0")
        for lo, hi in (("image_min_pixels", "image_max_pixels"), ("video_min_pixels", "video_max_pixels")):
            if (
                getattr(self, lo) is not None
                and getattr(self, hi) is not None
                and getattr(self, lo) > getattr(self, hi)
            ):
                bad(lo, f"is larger than {hi} = {getattr(self, hi)}")
        if self.video_fps is not None and self.video_fps <= 0:
            bad("video_fps", "must be > 0")
        if self.video_min_frames is not None and self.video_min_frames < 1:
            bad("video_min_frames", "must be >= 1")
        if self.video_max_frames is not None and self.video_max_frames < (self.video_min_frames or 1):
            bad("video_max_frames", "must be >= video_min_frames")
        if self.cutoff_len <= 0:
            bad("cutoff_len", "must be > 0")
        if self.max_tokens <= 0:
            bad("max_tokens", "must be > 0")
        if self.max_aspect_ratio < 1:
            bad("max_aspect_ratio", "must be >= 1")
        if self.num_workers < 0:
            bad("num_workers", "must be >= 0")

    def processor_options(self) -> dict:
        """Keyword arguments for `build_processor` (media and encoding options)."""
        return {k: getattr(self, k) for k in PROCESSOR_KEYS}


def split_list(value) -> list[str]:
    """'a.json,b.jsonl' or ['a.json', 'b.jsonl'] -> ['a.json', 'b.jsonl']."""
    if value is None:
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return [str(p) for p in value]
