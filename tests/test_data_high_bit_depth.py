"""High-bit-depth and float images reach the model with their real brightness, checked against a reference
computed here: the same picture saved as an 8-bit image by hand must give identical patches.

PIL's `convert("RGB")` clips 16-bit and float pixels to [0, 255] (a 16-bit photo becomes white, a float one in
[0, 1] black), and transformers' processor does the same, so parity tests against it cannot see this.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlmtune.data import BadSample
from vlmtune.data.media import MediaOptions, load_image

OPTS = MediaOptions(image_min_pixels=64 * 64, image_max_pixels=64 * 64)


def ramp(seed: int = 0) -> np.ndarray:
    """A 64x64 picture in [0, 1]: a diagonal ramp plus noise, so every level and both axes matter."""
    y, x = np.mgrid[0:64, 0:64] / 63.0
    noise = np.random.default_rng(seed).uniform(-0.05, 0.05, (64, 64))
    return np.clip(0.6 * x + 0.4 * y + noise, 0, 1)


def patches_of_8bit(tmp_path, pixels: np.ndarray) -> np.ndarray:
    """The reference: `pixels` (uint8, grey or RGB) saved as an 8-bit PNG and loaded."""
    path = str(tmp_path / "reference.png")
    Image.fromarray(pixels).save(path)
    return load_image(path, OPTS)[0].numpy()


def png16(path: str, pixels: np.ndarray) -> None:
    """A 16-bit PNG (grey, or RGB that PIL cannot write) from uint16 [H, W] or [H, W, 3]."""
    h, w = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + pixels[r].astype(">u2").tobytes() for r in range(h))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    levels = np.rint(ramp() * 65535).astype(np.uint16)
    png16(str(tmp_path / "grey16.png"), levels)
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    got = load_image(str(tmp_path / "grey16.png"), OPTS)[0].numpy()
    want = patches_of_8bit(tmp_path, np.rint(levels / 257.0).astype(np.uint8))  # 65535 -> 255, linearly
    np.testing.assert_array_equal(got, want)
    assert abs(got.mean() - (ramp().mean() * 2 - 1)) < 0.01  # normalised mean: the ramp's, not white's 1.0


def test_16bit_rgb_png_keeps_its_colours(tmp_path):
    levels = np.stack([ramp(0), ramp(1)[::-1], 1 - ramp(2)], axis=-1)
    levels = np.rint(levels * 65535).astype(np.uint16)
    png16(str(tmp_path / "rgb16.png"), levels)
    got = load_image(str(tmp_path / "rgb16.png"), OPTS)[0].numpy()
    want = patches_of_8bit(tmp_path, (levels >> 8).astype(np.uint8))  # PIL opens it as RGB: the high byte
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", ["F", "I"])
def test_float_and_32bit_tiff_are_scaled(tmp_path, mode):
    values = ramp().astype(np.float32) if mode == "F" else np.rint(ramp() * 65535).astype(np.int32)
    Image.fromarray(values).save(tmp_path / "deep.tiff")
    assert Image.open(tmp_path / "deep.tiff").mode == mode
    got = load_image(str(tmp_path / "deep.tiff"), OPTS)[0].numpy()
    scale = 255.0 if mode == "F" else 255.0 / 65535
    want = patches_of_8bit(tmp_path, np.rint(values.astype(np.float64) * scale).astype(np.uint8))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "values",
    [ramp().astype(np.float32) * 1000, np.full((64, 64), np.nan, np.float32), -np.ones((64, 64), np.int32)],
    ids=["float_above_one", "float_nan", "negative_int"],
)
def test_out_of_range_deep_images_are_refused(tmp_path, values):
    Image.fromarray(values).save(tmp_path / "odd.tiff")
    with pytest.raises(BadSample, match=r"unsupported_image: image .*odd.tiff has '(F|I)' pixels in"):
        load_image(str(tmp_path / "odd.tiff"), OPTS)
