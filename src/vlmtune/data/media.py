"""Images (PIL) and videos (PyAV) -> vision-tower patches, following Qwen3-VL's processing rules.

Patches are rows of `C * temporal_patch_size * patch * patch` values (1536 for Qwen3-VL), ordered so that
each 2x2 group of neighbouring patches (one merged token) is contiguous; an image repeats its frame to fill
the temporal patch. Every size decision (`image_grid`, `video_plan`) is computed from the file header
alone, so token counts are known before any pixel is decoded.

A media source is a file path or an `Embedded` (the file's bytes, stored in the dataset itself: a Parquet /
`datasets` row's `{"bytes", "path"}` item); both are read the same way, headers first.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from PIL import Image, ImageOps

from vlmtune.errors import CheckpointError

from .report import BadSample

EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Embedded:
    """A media file's bytes held by the dataset row (`name`: the row's path for it, for messages only)."""

    data: bytes = field(repr=False)
    name: str = ""
    kind: str = "image"

    def __str__(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        return f"embedded {self.kind}{name} ({len(self.data)} bytes)"

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.data)


def _readable(source: str | Embedded):
    """What PIL and PyAV open: the path, or a file object over the embedded bytes."""
    return source.open() if isinstance(source, Embedded) else source


@dataclass
class MediaOptions:
    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    image_min_pixels: int = 65536
    image_max_pixels: int = 16777216
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 768
    video_min_pixels: int = 4096
    video_max_pixels: int = 25165824
    max_aspect_ratio: float = 200.0
    image_min_side: int = 4
    max_source_pixels: int = 178_956_970

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_checkpoint(cls, model_dir: str | None, **overrides) -> MediaOptions:
        """Defaults from the checkpoint's preprocessor configs; non-None `overrides` win."""
        values: dict = {}
        image_cfg = _read_json(model_dir, "preprocessor_config.json")
        video_cfg = _read_json(model_dir, "video_preprocessor_config.json")
        for key in ("patch_size", "merge_size", "temporal_patch_size", "rescale_factor"):
            if key in image_cfg:
                values[key] = image_cfg[key]
        for key in ("image_mean", "image_std"):
            if key in image_cfg:
                values[key] = tuple(image_cfg[key])
        size = image_cfg.get("size") or {}
        values["image_min_pixels"] = image_cfg.get(
            "min_pixels", size.get("shortest_edge", cls.image_min_pixels)
        )
        values["image_max_pixels"] = image_cfg.get(
            "max_pixels", size.get("longest_edge", cls.image_max_pixels)
        )
        vsize = video_cfg.get("size") or {}
        values["video_min_pixels"] = video_cfg.get(
            "min_pixels", vsize.get("shortest_edge", cls.video_min_pixels)
        )
        values["video_max_pixels"] = video_cfg.get(
            "max_pixels", vsize.get("longest_edge", cls.video_max_pixels)
        )
        for ours, theirs in (
            ("video_fps", "fps"),
            ("video_min_frames", "min_frames"),
            ("video_max_frames", "max_frames"),
        ):
            if video_cfg.get(theirs) is not None:
                values[ours] = video_cfg[theirs]
        names = {f.name for f in fields(cls)}
        for key, value in overrides.items():
            if key not in names:
                raise TypeError(f"unknown media option {key!r}; valid: {sorted(names)}")
            if value is not None:
                values[key] = value
        opts = cls(**values)
        _check_options(opts, model_dir)
        return opts


def _read_json(model_dir: str | None, name: str) -> dict:
    if not model_dir:
        return {}
    path = os.path.join(model_dir, name)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise CheckpointError(f"{path}: unreadable ({e}); copy it again from the base checkpoint") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _check_options(opts: MediaOptions, model_dir: str | None) -> None:
    """Sizes from the preprocessor configs are positive numbers and mean / std have three entries."""
    where = f"{model_dir}: preprocessor_config.json / video_preprocessor_config.json"
    for f in fields(opts):
        value = getattr(opts, f.name)
        if isinstance(f.default, tuple):
            ok = isinstance(value, tuple) and len(value) == 3 and all(_number(v) for v in value)
            ok = ok and (f.name != "image_std" or all(v > 0 for v in value))
        else:
            ok = _number(value) and value > 0 and (not isinstance(f.default, int) or value == int(value))
        if not ok:
            raise CheckpointError(f"{where}: {f.name} = {value!r} is not a valid {type(f.default).__name__}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------- sizes


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Nearest size with both sides multiples of `factor` and area within [min_pixels, max_pixels]."""
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def video_smart_resize(frames: int, height: int, width: int, opts: MediaOptions) -> tuple[int, int]:
    """As `smart_resize`, with the pixel budget counted over all frames (rounded to whole temporal patches)."""
    f, tp = opts.factor, opts.temporal_patch_size
    if height < f or width < f:  # tiny frames are first scaled up so the short side reaches one factor
        up = max(f / height, f / width)
        height, width = int(height * up), int(width * up)
    h = round(height / f) * f
    w = round(width / f) * f
    t = round(frames / tp) * tp
    if t * h * w > opts.video_max_pixels:
        scale = math.sqrt(frames * height * width / opts.video_max_pixels)
        h = max(f, math.floor(height / scale / f) * f)
        w = max(f, math.floor(width / scale / f) * f)
    elif t * h * w < opts.video_min_pixels:
        scale = math.sqrt(opts.video_min_pixels / (frames * height * width))
        h = math.ceil(height * scale / f) * f
        w = math.ceil(width * scale / f) * f
    return h, w


def _check_shape(height: int, width: int, opts: MediaOptions, path: str, kind: str) -> None:
    if height * width > opts.max_source_pixels:
        raise BadSample(
            "decompression_bomb",
            f"{kind} {path} is {width}x{height} = {height * width} pixels, over max_source_pixels {opts.max_source_pixels}",
        )
    if min(height, width) < opts.image_min_side:
        raise BadSample(
            "image_too_small",
            f"{kind} {path} is {width}x{height}, a side is below image_min_side {opts.image_min_side}",
        )
    ratio = max(height, width) / min(height, width)
    if ratio > opts.max_aspect_ratio:
        raise BadSample(
            "aspect_ratio",
            f"{kind} {path} is {width}x{height}, aspect ratio {ratio:.1f} > {opts.max_aspect_ratio:g}",
        )


# ---------------------------------------------------------------------------------------------- images


def _open_image(path: str | Embedded) -> Image.Image:
    if not isinstance(path, Embedded) and not os.path.isfile(path):
        raise BadSample("missing_image", f"image file not found: {path}")
    try:
        return Image.open(_readable(path))
    except Image.DecompressionBombError as e:
        raise BadSample("decompression_bomb", f"{path}: {e}") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... for broken headers
        raise BadSample("corrupt_image", f"cannot read image header of {path}: {e}") from None


def _orientation(img: Image.Image) -> int:
    """EXIF orientation without decoding pixels (PIL's PNG getexif would load the whole image)."""
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
            return int(exif.get(EXIF_ORIENTATION, 1))
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:
        return 1


def probe_image(path: str | Embedded, opts: MediaOptions) -> tuple[int, int]:
    """(height, width) after EXIF orientation, read from the header only; validated."""
    with _open_image(path) as img:
        width, height = img.size
        if _orientation(img) in (5, 6, 7, 8):  # rotated by 90 degrees
            width, height = height, width
    _check_shape(height, width, opts, path, "image")
    return height, width


def image_grid(height: int, width: int, opts: MediaOptions) -> tuple[int, int, int]:
    """`(t, h, w)` patch grid of an image of this size."""
    h, w = smart_resize(height, width, opts.factor, opts.image_min_pixels, opts.image_max_pixels)
    return 1, h // opts.patch_size, w // opts.patch_size


def to_8bit(img: Image.Image, path: str) -> Image.Image:
    """16-bit and 32-bit integer images scaled from [0, 65535], float images from [0, 1], to 8-bit grey.

    PIL's own `convert` clips these to [0, 255] (a 16-bit photo turns white, a float one black), and so does
    transformers' processor. 16-bit colour PNGs already open as 8-bit RGB (PIL keeps the high byte)."""
    if img.mode not in HIGH_DEPTH_MODES:
        return img
    pixels = np.asarray(img, dtype=np.float64)
    lo, hi = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    limit = 1.0 if img.mode == "F" else 65535.0
    if not (np.isfinite(pixels).all() and lo >= 0 and hi <= limit):
        raise BadSample(
            "unsupported_image",
            f"image {path} has {img.mode!r} pixels in [{lo:g}, {hi:g}]; vlmtune reads "
            f"{'float images as [0, 1]' if img.mode == 'F' else 'integer images as [0, 65535]'}: convert it "
            "to an 8-bit PNG or JPEG",
        )
    return Image.fromarray(np.rint(pixels * (255.0 / limit)).astype(np.uint8), mode="L")


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers does)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Embedded, opts: MediaOptions) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Decode, orient, convert, resize and patchify one image -> (patches [N, 1536], grid)."""
    with _open_image(path) as img:
        _check_shape(img.size[1], img.size[0], opts, path, "image")  # before decoding: bombs stop here
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
        except Exception as e:  # truncated or corrupt pixel data
            raise BadSample("corrupt_image", f"cannot decode image {path}: {e}") from None
    img = to_8bit(img, path)
    try:
        img = to_rgb(img)
    except (ValueError, OSError) as e:  # a mode PIL cannot convert (e.g. LAB, multi-channel float)
        raise BadSample("unsupported_image", f"image {path} in mode {img.mode!r}: {e}") from None
    grid = image_grid(img.size[1], img.size[0], opts)
    img = img.resize((grid[2] * opts.patch_size, grid[1] * opts.patch_size), resample=Image.BICUBIC)
    frame = normalize(np.asarray(img), opts)  # [H, W, C] float32
    frames = frame.permute(2, 0, 1)[None].expand(opts.temporal_patch_size, -1, -1, -1)
    return patchify(frames, opts), grid


def normalize(pixels: np.ndarray, opts: MediaOptions) -> torch.Tensor:
    """uint8 [..., C] -> float32 (x * rescale - mean) / std."""
    x = pixels.astype(np.float32) * np.float32(opts.rescale_factor)
    x -= np.asarray(opts.image_mean, dtype=np.float32)
    x /= np.asarray(opts.image_std, dtype=np.float32)
    return torch.from_numpy(x)


def patchify(frames: torch.Tensor, opts: MediaOptions) -> torch.Tensor:
    """[T, C, H, W] (T a multiple of temporal_patch_size) -> [T/tp * H/p * W/p, C*tp*p*p] in 2x2-merge order."""
    t, c, height, width = frames.shape
    p, m, tp = opts.patch_size, opts.merge_size, opts.temporal_patch_size
    gt, gh, gw = t // tp, height // p, width // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    # (time, merged row, merged col, row in 2x2, col in 2x2) index a patch; (C, tp, p, p) are its values.
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p)


# ---------------------------------------------------------------------------------------------- videos


@dataclass
class VideoPlan:
    indices: list[int]  # decoded frame indices, padded to a whole number of temporal patches
    timestamps: list[float]  # seconds, one per frame-pair (mean of its first and last frame time)
    grid: tuple[int, int, int]
    fps: float


def probe_video(path: str | Embedded) -> tuple[int, float, int, int]:
    """(total_frames, fps, height, width) from the container header."""
    import av

    if not isinstance(path, Embedded) and not os.path.isfile(path):
        raise BadSample("missing_video", f"video file not found: {path}")
    try:
        with av.open(_readable(path)) as container:
            if not container.streams.video:
                raise BadSample("corrupt_video", f"{path} has no video stream")
            stream = container.streams.video[0]
            total = int(stream.frames)
            fps = float(stream.average_rate) if stream.average_rate else 24.0
            height, width = stream.height, stream.width
            if total <= 0:  # container without a frame count: count packets instead
                total = sum(1 for pkt in container.demux(stream) if pkt.size)
    except BadSample:
        raise
    except Exception as e:
        raise BadSample("corrupt_video", f"cannot open video {path}: {e}") from None
    if total <= 0 or not height or not width:
        raise BadSample("corrupt_video", f"video {path} has no frames")
    return total, fps, height, width


def video_plan(
    total: int, fps: float, height: int, width: int, opts: MediaOptions, path: str = ""
) -> VideoPlan:
    """Frame indices, timestamps and grid of a video, from its header facts."""
    n = int(total / fps * opts.video_fps)
    n = min(max(n, opts.video_min_frames), opts.video_max_frames, total)
    tp = opts.temporal_patch_size
    if n < tp:
        raise BadSample("corrupt_video", f"video {path} has {total} frame(s); at least {tp} are needed")
    _check_shape(height, width, opts, path, "video")
    indices = np.linspace(0, total - 1, n).round().astype(int).tolist()
    indices += [indices[-1]] * (-n % tp)  # repeat the last frame to fill the last temporal patch
    seconds = [i / fps for i in indices]
    timestamps = [(seconds[i] + seconds[i + tp - 1]) / 2 for i in range(0, len(seconds), tp)]
    h, w = video_smart_resize(n, height, width, opts)
    return VideoPlan(
        indices, timestamps, (len(indices) // tp, h // opts.patch_size, w // opts.patch_size), fps
    )


def load_video(path: str | Embedded, opts: MediaOptions) -> tuple[torch.Tensor, VideoPlan]:
    """Decode the planned frames, resize, normalize and patchify -> (patches [N, 1536], plan)."""
    import av

    plan = video_plan(*probe_video(path), opts, path)
    wanted = set(plan.indices)
    last = plan.indices[-1]
    size = (plan.grid[2] * opts.patch_size, plan.grid[1] * opts.patch_size)
    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(_readable(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i > last:
                    break
                if i in wanted:
                    img = frame.to_image().resize(size, resample=Image.BICUBIC)
                    frames[i] = np.asarray(img)
    except Exception as e:
        raise BadSample("corrupt_video", f"cannot decode video {path}: {e}") from None
    missing = wanted - set(frames)
    if missing:
        raise BadSample(
            "corrupt_video",
            f"video {path} is truncated: frame {min(missing)} of {plan.indices[-1] + 1} not decodable",
        )
    stack = normalize(np.stack([frames[i] for i in plan.indices]), opts).permute(0, 3, 1, 2)
    return patchify(stack, opts), plan
