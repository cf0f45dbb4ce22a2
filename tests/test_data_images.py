"""Image patches and grids vs transformers' PIL Qwen2-VL image processor configured as Qwen3-VL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from vlmtune.data.media import MediaOptions, image_grid, load_image, probe_image

MIN_PIXELS, MAX_PIXELS = 65536, 400_000  # a low max exercises the downscale branch on the large photos


def hf_processor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


@pytest.fixture(scope="session")
def image_files(photo_paths, tmp_path_factory):
    """Real photos at several sizes and modes, saved as files."""
    d = tmp_path_factory.mktemp("images")
    astronaut = Image.open(photo_paths["astronaut"]).convert("RGB")  # 512x512
    chelsea = Image.open(photo_paths["chelsea"]).convert("RGB")  # 451x300
    out = {}

    def save(name, img, fmt="PNG", **kw):
        path = str(d / f"{name}.{'jpg' if fmt == 'JPEG' else 'png'}")
        img.save(path, fmt, **kw)
        out[name] = path

    save("tiny", chelsea.resize((23, 15)))
    save("panoramic", astronaut.resize((1500, 40)))
    save("large", chelsea.resize((1804, 1200)))
    save("coffee_jpeg", Image.open(photo_paths["coffee"]), "JPEG", quality=90)
    save("rocket", Image.open(photo_paths["rocket"]), "JPEG", quality=95)
    save("grayscale", Image.open(photo_paths["camera"]))  # mode L
    rgba = astronaut.copy()
    alpha = np.tile(np.linspace(0, 255, 512, dtype=np.uint8), (512, 1))
    rgba.putalpha(Image.fromarray(alpha))
    save("rgba", rgba)
    save("la", rgba.convert("LA"))
    save("palette", chelsea.convert("P", palette=Image.ADAPTIVE))
    save("cmyk", chelsea.convert("CMYK"), "JPEG")
    # EXIF orientation 6: stored landscape, shown rotated by 90 degrees
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rotated", chelsea, "JPEG", exif=exif.tobytes(), quality=95)
    return out


NAMES = [
    "tiny",
    "panoramic",
    "large",
    "coffee_jpeg",
    "rocket",
    "grayscale",
    "rgba",
    "la",
    "palette",
    "cmyk",
    "exif_rotated",
]


@pytest.mark.parametrize("name", NAMES)
def test_image_matches_transformers(image_files, name):
    opts = MediaOptions(image_min_pixels=MIN_PIXELS, image_max_pixels=MAX_PIXELS)
    patches, grid = load_image(image_files[name], opts)
    with Image.open(image_files[name]) as img:
        img.load()
        ref = hf_processor()(images=[ImageOps.exif_transpose(img)], return_tensors="pt")
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert patches.shape == ref["pixel_values"].shape
    assert patches.shape[1] == 1536
    torch.testing.assert_close(patches, ref["pixel_values"], atol=1e-5, rtol=0)
    # the header-only size path gives the same grid as decoding
    assert image_grid(*probe_image(image_files[name], opts), opts) == tuple(grid)


def test_exif_orientation_swaps_sides(image_files):
    opts = MediaOptions()
    # stored 451 wide x 300 high; orientation 6 shows it 300 wide x 451 high
    assert probe_image(image_files["exif_rotated"], opts) == (451, 300)


def test_default_pixel_budget_matches_transformers(image_files):
    """Checkpoint defaults (min 65536, max 16777216): the large photo keeps its size rounded to 32."""
    opts = MediaOptions()
    patches, grid = load_image(image_files["large"], opts)
    with Image.open(image_files["large"]) as img:
        ref = hf_processor(65536, 16777216)(images=[img], return_tensors="pt")
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    torch.testing.assert_close(patches, ref["pixel_values"], atol=1e-5, rtol=0)


def test_options_from_checkpoint_and_overrides(tmp_path):
    import json

    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"patch_size": 16, "merge_size": 2, "size": {"shortest_edge": 1000, "longest_edge": 2000}})
    )
    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps(
            {"fps": 1, "min_frames": 2, "max_frames": 10, "size": {"shortest_edge": 10, "longest_edge": 20}}
        )
    )
    opts = MediaOptions.from_checkpoint(str(tmp_path), image_max_pixels=5000, video_fps=None)
    assert (opts.image_min_pixels, opts.image_max_pixels) == (1000, 5000)
    assert (opts.video_fps, opts.video_min_frames, opts.video_max_frames) == (1, 2, 10)
    assert (opts.video_min_pixels, opts.video_max_pixels) == (10, 20)
    with pytest.raises(TypeError, match="image_max_pixel"):
        MediaOptions.from_checkpoint(str(tmp_path), image_max_pixel=1)
