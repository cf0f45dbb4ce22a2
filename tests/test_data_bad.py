"""Bad input: each kind is skipped and counted (with file, line and reason) or, with on_bad_sample=error,
stops with the same facts."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib

import pytest
from PIL import Image

from vlmtune.data import BadSample, DataConfig, build_loader, build_processor, load_samples

GOOD = {
    "messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Hello."}],
    "images": ["ok.png"],
}


def _png_header(path, width, height):
    """A PNG whose header declares width x height (the pixel data is absent)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory, photo_paths, video_paths):
    d = tmp_path_factory.mktemp("bad_media")
    chelsea = Image.open(photo_paths["chelsea"]).convert("RGB")
    chelsea.save(d / "ok.png")
    with open(d / "corrupt.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nthis is not a png")
    chelsea.save(d / "full.jpg", quality=95)
    data = open(d / "full.jpg", "rb").read()
    with open(d / "truncated.jpg", "wb") as f:
        f.write(data[: len(data) // 3])
    chelsea.resize((2010, 10)).save(d / "thin.png")
    chelsea.resize((3, 3)).save(d / "speck.png")
    # 225M pixels: over the 179M guard, under PIL's own 2x limit
    _png_header(str(d / "bomb.png"), 15000, 15000)
    video = next(p for p in video_paths if p.endswith("carphone_pristine.mp4"))
    shutil.copy(video, d / "ok.mp4")
    with open(d / "corrupt.mp4", "wb") as f:
        f.write(os.urandom(4096))
    (d / "sub").mkdir()
    outside = tmp_path_factory.mktemp("outside")
    chelsea.save(outside / "elsewhere.png")
    return str(d / "sub"), str(outside / "elsewhere.png"), str(d)


def _sample(content="<image>Hi", images=("ok.png",), **over):
    s = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "Hello."}]}
    if images:
        s["images"] = list(images)
    s.update(over)
    return s


def cases(outside_png):
    return {
        "malformed_json": '{"messages": [',
        "missing_image": _sample(images=["nope.png"]),
        "corrupt_image": _sample(images=["corrupt.png"]),
        "truncated_image": _sample(images=["truncated.jpg"]),
        "aspect_ratio": _sample(images=["thin.png"]),
        "image_too_small": _sample(images=["speck.png"]),
        "decompression_bomb": _sample(images=["bomb.png"]),
        "missing_video": _sample("<video>Hi", images=(), videos=["nope.mp4"]),
        "corrupt_video": _sample("<video>Hi", images=(), videos=["corrupt.mp4"]),
        "placeholder_mismatch": _sample("<image><image>Hi"),
        "no_assistant_turn": {"messages": [{"role": "user", "content": "Hi"}]},
        "unknown_role": {"conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
        "empty_content": {
            "messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "Yo"}]
        },
        "over_long": _sample("word " * 700 + "<image>"),  # the cut at cutoff_len would split the image block
        "media_outside_dataset_dir": _sample(images=["../../" + os.path.relpath(outside_png, "/")]),
    }


REASON = {"truncated_image": "corrupt_image"}


def _write(tmp_path, name, bad):
    path = str(tmp_path / f"{name}.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps(GOOD) + "\n")
        f.write((bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
        f.write(json.dumps(GOOD) + "\n")
    return path


def _run(tiny_ckpt, cfg):
    train, val, report = load_samples(cfg)
    proc = build_processor(tiny_ckpt[0], cfg)
    loader = build_loader(cfg, proc, samples=train, dp_rank=0, dp_size=1, seed=0, max_tokens=1000)
    batches = list(loader)
    report.merge(loader.skip_report)
    return report, batches


@pytest.mark.parametrize("kind", list(cases("/x")))
def test_bad_sample_skip_and_error(tiny_ckpt, media_dir, tmp_path, kind, caplog):
    sub, outside, root = media_dir
    bad = cases(outside)[kind]
    dataset_dir = root
    if kind == "media_outside_dataset_dir":
        dataset_dir = sub
        shutil.copy(os.path.join(root, "ok.png"), os.path.join(sub, "ok.png"))
    path = _write(tmp_path, kind, bad)
    common = dict(
        dataset=path,
        dataset_dir=dataset_dir,
        shuffle=False,
        num_workers=0,
        image_max_pixels=100_000,
        video_max_pixels=300_000,
        cutoff_len=600,
        restrict_media_to_dataset_dir=True,
    )
    report, batches = _run(tiny_ckpt, DataConfig(**common))
    reason = REASON.get(kind, kind)
    assert dict(report.counts) == {reason: 1}
    assert f"{path}, line 2: {reason}" in report.examples[reason]
    assert reason in report.table()
    assert sorted(sid for b in batches for sid in b.sample_ids) == [f"{path}:line 1", f"{path}:line 3"]
    assert any(f"line 2: {reason}" in r.getMessage() for r in caplog.records)
    with pytest.raises(BadSample, match=f"{path}, line 2: {reason}"):
        _run(tiny_ckpt, DataConfig(**common, on_bad_sample="error"))


def test_malformed_json_list_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"messages": []},\n {"messages": [}\n]\n')
    with pytest.raises(BadSample, match=r"broken.json, line 3: malformed_json"):
        load_samples(DataConfig(dataset=str(path)))


def test_pil_level_bomb_is_reported(tiny_ckpt, tmp_path):
    _png_header(str(tmp_path / "huge.png"), 100000, 100000)  # PIL itself refuses to open it
    proc = build_processor(tiny_ckpt[0])
    with pytest.raises(BadSample, match="decompression_bomb"):
        proc.encode(_sample(images=["huge.png"]), dataset_dir=str(tmp_path))
