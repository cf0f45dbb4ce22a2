"""Videos vs a reference written from Qwen3-VL's documented video rules (transformers' video processor needs
torchvision, which is not installed): frames sampled at `fps` within [min_frames, max_frames], indices
`linspace(0, total-1, n).round()`, the last frame repeated to an even count, a size rounded to multiples of
32 with the pixel budget counted over all frames, one `<t seconds>` text per frame-pair (mean time of its
two frames), patches in 2x2-merge order."""

from __future__ import annotations

import math
import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from vlmtune.data import build_processor
from vlmtune.data.media import MediaOptions, load_video, probe_video, video_plan

VID = 151656


def reference_video(path, fps_target, min_frames, max_frames, min_pixels, max_pixels):
    with av.open(path) as c:
        stream = c.streams.video[0]
        total, fps = stream.frames, float(stream.average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    n = min(max(int(total / fps * fps_target), min_frames), max_frames, total)
    idx = [int(i) for i in np.round(np.linspace(0, total - 1, n))]
    h0, w0 = frames[0].shape[:2]
    # size rule: multiples of 32; budget over frames
    f = 32
    hb, wb, tb = round(h0 / f) * f, round(w0 / f) * f, round(n / 2) * 2
    if tb * hb * wb > max_pixels:
        beta = math.sqrt(n * h0 * w0 / max_pixels)
        hb, wb = max(f, math.floor(h0 / beta / f) * f), max(f, math.floor(w0 / beta / f) * f)
    elif tb * hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (n * h0 * w0))
        hb, wb = math.ceil(h0 * beta / f) * f, math.ceil(w0 * beta / f) * f
    if len(idx) % 2:
        idx.append(idx[-1])
    times = [i / fps for i in idx]
    stamps = [(times[k] + times[k + 1]) / 2 for k in range(0, len(times), 2)]
    clip = np.stack([np.asarray(Image.fromarray(frames[i]).resize((wb, hb), Image.BICUBIC)) for i in idx])
    x = (clip.astype(np.float32) / 255 - 0.5) / 0.5  # [T, H, W, C]
    gt, gh, gw = len(idx) // 2, hb // 16, wb // 16
    x = x.reshape(gt, 2, gh // 2, 2, 16, gw // 2, 2, 16, 3)
    # patch index (t, mh, mw, ih, iw); value index (C, tp, ph, pw)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7).reshape(gt * gh * gw, 3 * 2 * 16 * 16)
    return idx, stamps, (gt, gh, gw), torch.from_numpy(np.ascontiguousarray(x))


SETTINGS = {
    "carphone_pristine.mp4": dict(video_fps=2.0, video_min_pixels=4096, video_max_pixels=25165824),
    "bikes.mp4": dict(video_fps=1.5, video_min_pixels=4096, video_max_pixels=3_000_000),  # 15 frames: padded
    "bigbuckbunny.mp4": dict(video_fps=2.0, video_min_pixels=4096, video_max_pixels=1_500_000),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_video_matches_rules(video_paths, name):
    path = next(p for p in video_paths if p.endswith(name))
    s = SETTINGS[name]
    opts = MediaOptions(video_min_frames=4, video_max_frames=768, **s)
    patches, plan = load_video(path, opts)
    idx, stamps, grid, ref = reference_video(
        path, s["video_fps"], 4, 768, s["video_min_pixels"], s["video_max_pixels"]
    )
    assert plan.indices == idx
    assert plan.timestamps == pytest.approx(stamps)
    assert plan.grid == grid
    assert video_plan(*probe_video(path), opts, path).grid == grid  # header-only path agrees
    torch.testing.assert_close(patches, ref, atol=1e-5, rtol=0)


def test_max_frames_caps_sampling(video_paths):
    path = next(p for p in video_paths if p.endswith("bikes.mp4"))
    plan = video_plan(*probe_video(path), MediaOptions(video_max_frames=6), path)
    assert plan.indices == [int(i) for i in np.round(np.linspace(0, 249, 6))]
    assert plan.grid[0] == 3


def test_video_tokens_and_positions(tiny_ckpt, video_paths):
    path = next(p for p in video_paths if p.endswith("carphone_pristine.mp4"))
    proc = build_processor(tiny_ckpt[0], video_max_pixels=400_000)
    sample = {
        "messages": [
            {"role": "user", "content": "Clip:<video>What happens?"},
            {"role": "assistant", "content": "A call."},
        ],
        "videos": [os.path.basename(path)],
    }
    out = proc.encode(sample, dataset_dir=os.path.dirname(path))
    _, stamps, grid, _ = reference_video(path, 2.0, 4, 768, 4096, 400_000)
    assert out["video_grid_thw"].tolist() == [list(grid)]
    frame = "<|vision_start|>" + "<|video_pad|>" * (grid[1] * grid[2] // 4) + "<|vision_end|>"
    block = "".join(f"<{t:.1f} seconds>" + frame for t in stamps)
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Clip:"},
                {"type": "video"},
                {"type": "text", "text": "What happens?"},
            ],
        },
        {"role": "assistant", "content": "A call."},
    ]
    text = proc.tokenizer.apply_chat_template(conv, tokenize=False)
    text = text.replace("<|vision_start|><|video_pad|><|vision_end|>", block)
    assert out["input_ids"].tolist() == proc.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert proc.tokenizer.decode(out["labels"][out["labels"] != -100]) == "A call.<|im_end|>"
    ids = out["input_ids"][None]
    ref_pos, _ = tiny_ckpt[1].model.get_rope_index(ids, 2 * (ids == VID).int(), None, out["video_grid_thw"])
    assert torch.equal(out["position_ids"], ref_pos[:, 0])
    assert proc.measure(sample, os.path.dirname(path))[0] == out["input_ids"].numel()
