"""The `data:` section of a training config: datasets, media sizes, encoding and the bad-sample policy.

Media options left as `null` take the checkpoint's `preprocessor_config.json` /
`video_preprocessor_config.json` values (see `media.MediaOptions.from_checkpoint`). The token budget of a
micro-batch is `train.micro_batch_tokens` and the seed is `train.seed` (one of each for the whole run).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmtune.errors import ConfigError
from vlmtune.options import build_section
from vlmtune.options import option as _f


@dataclass
class DataConfig:
    dataset: str | list = _f("", "training datasets: comma-separated (or a list of) .json / .jsonl files")
    dataset_dir: str = _f(
        ".", "base of relative media paths (and of dataset paths that do not exist as given)"
    )
    max_samples: int | None = _f(None, "read at most this many samples per dataset (null: all)")
    mix_ratios: list | None = _f(None, "per dataset: 0.5 keeps a seeded half, 2.0 repeats it twice")
    shuffle: bool = _f(True, "shuffle the training samples (seeded by train.seed)")
    val_ratio: float = _f(0.0, "seeded fraction of the training samples held out for validation")
    val_dataset: str | list | None = _f(None, "validation files instead of (or with) val_ratio")
    cache_dir: str | None = _f(None, "where the length index is cached (null: no cache)")
    image_min_pixels: int | None = _f(None, "smallest image area after resizing (null: the checkpoint's)")
    image_max_pixels: int | None = _f(None, "largest image area after resizing (null: the checkpoint's)")
    video_fps: float | None = _f(None, "frames sampled per second of video (null: the checkpoint's)")
    video_min_frames: int | None = _f(None, "fewest sampled frames per video (null: the checkpoint's)")
    video_max_frames: int | None = _f(None, "most sampled frames per video (null: the checkpoint's)")
    video_min_pixels: int | None = _f(
        None, "smallest video area over all sampled frames (null: checkpoint's)"
    )
    video_max_pixels: int | None = _f(None, "largest video area over all sampled frames (null: checkpoint's)")
    max_aspect_ratio: float = _f(200.0, "images / videos more elongated than this are bad samples")
    image_min_side: int = _f(4, "images with a side below this many pixels are bad samples")
    max_source_pixels: int = _f(178_956_970, "decompression-bomb guard on the decoded size (PIL's default)")
    cutoff_len: int = _f(8192, "longest sample in tokens; longer ones are cut (never inside a vision block)")
    train_on_prompt: bool = _f(False, "train on the user turns too, not only on the answers")
    mask_history: bool = _f(False, "train only the last answer of a multi-turn conversation")
    system_prompt: str | None = _f(None, "system prompt added to conversations that have none")
    enable_thinking: bool | None = _f(None, "passed to the chat template (Qwen3 thinking templates)")
    on_bad_sample: str = _f(
        "skip", "a sample that cannot be used: skip and count it, or stop", ("skip", "error")
    )
    restrict_media_to_dataset_dir: bool = _f(
        True, "refuse media paths that lead outside dataset_dir (false: a trusted dataset may name any file)"
    )
    num_workers: int = _f(2, "DataLoader worker processes decoding media (0: in the training process)")
    prefetch_factor: int = _f(2, "micro-batches each worker prepares ahead")

    def __post_init__(self):
        self.dataset = split_list(self.dataset)
        self.val_dataset = split_list(self.val_dataset) if self.val_dataset else []
        self.validate()

    @classmethod
    def from_dict(cls, raw: dict | None) -> DataConfig:
        """The section from a mapping, checked like every config section (unknown keys, types, choices)."""
        return build_section("data", cls, raw)

    def validate(self) -> None:
        def bad(name, why):
            raise ConfigError(f"data.{name} = {getattr(self, name)!r}: {why}")

        if self.on_bad_sample not in ("skip", "error"):
            bad("on_bad_sample", "must be 'skip' or 'error'")
        if not 0.0 <= self.val_ratio < 1.0:
            bad("val_ratio", "must be in [0, 1)")
        if self.max_samples is not None and self.max_samples <= 0:
            bad("max_samples", "must be a positive integer or null")
        if self.mix_ratios is not None:
            if len(self.mix_ratios) != len(self.dataset):
                bad("mix_ratios", f"needs one ratio per dataset ({len(self.dataset)} datasets)")
            if not all(isinstance(r, (int, float)) and r > 0 for r in self.mix_ratios):
                bad("mix_ratios", "ratios must be numbers > 0")
        for name in ("image_min_pixels", "image_max_pixels", "video_min_pixels", "video_max_pixels"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                bad(name, "must be > 0")
        for lo, hi in (("image_min_pixels", "image_max_pixels"), ("video_min_pixels", "video_max_pixels")):
            if None not in (getattr(self, lo), getattr(self, hi)) and getattr(self, lo) > getattr(self, hi):
                bad(lo, f"is larger than {hi} = {getattr(self, hi)}")
        if self.video_fps is not None and self.video_fps <= 0:
            bad("video_fps", "must be > 0")
        if self.video_min_frames is not None and self.video_min_frames < 1:
            bad("video_min_frames", "must be >= 1")
        if self.video_max_frames is not None and self.video_max_frames < (self.video_min_frames or 1):
            bad("video_max_frames", "must be >= video_min_frames")
        for name, low in (
            ("cutoff_len", 1),
            ("max_aspect_ratio", 1),
            ("num_workers", 0),
            ("prefetch_factor", 1),
        ):
            if getattr(self, name) < low:
                bad(name, f"must be >= {low}")


def split_list(value) -> list[str]:
    """'a.json,b.jsonl' or ['a.json', 'b.jsonl'] -> ['a.json', 'b.jsonl']."""
    if value is None:
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return [str(p) for p in value]
