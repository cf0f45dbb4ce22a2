"""Inputs of `vlmtune verify`: the user's samples or built-in synthetic ones, encoded by the real processor.

The synthetic set covers every input shape the model accepts: text, one image, several images of different
sizes, a video, an image with a video, a left-padded batch and a packed row. Its images and video are
drawn here (numpy patterns saved as PNG, a short mp4 written with PyAV), so no file is downloaded and the
processor sees ordinary media files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlmtune.constants import IGNORE_INDEX as IGNORE
from vlmtune.data.batch import pack
from vlmtune.generation.generate import left_pad

# (kind, user turn, assistant turn, images, videos): media are names of the files `write_media` draws.
SYNTHETIC = (
    ("text", "Write one sentence about the sea.", "The sea is calm and blue today.", [], []),
    ("image", "<image>What is in this picture?", "Red and green stripes over a blue gradient.", ["a"], []),
    ("images", "<image><image>How do the two pictures differ?", "The second one is smaller.", ["b", "c"], []),
    ("video", "<video>What happens in this clip?", "A white square moves to the right.", [], ["v"]),
    (
        "image+video",
        "<image>Here is a picture.<video>Does the clip show it?",
        "No, it does not.",
        ["a"],
        ["v"],
    ),
)
BATCH_KINDS = ("image", "text", "video")  # rows of the synthetic padded batch and packed row
IMAGE_SIZES = {"a": (96, 128), "b": (128, 128), "c": (64, 96)}  # (height, width) in pixels
VIDEO_FRAMES, VIDEO_FPS, VIDEO_SIZE = 8, 4, (64, 96)


@dataclass
class Case:
    """One input kind: what the model runs (`forward`), which of its positions are real tokens (`keep`),
    the samples of a packed row (the reference runs each alone) and the left-padded generation prompt."""

    kind: str
    forward: dict  # Qwen3VL.forward keywords: input_ids [B, L], labels, position_ids [3, B, L], media, ...
    keep: torch.Tensor  # [B, L] bool
    parts: list[dict] | None = None  # packed row: the encoded samples in order
    prompt: dict | None = None  # `left_pad` batch ending in the assistant header; None for a packed row


def _image(height: int, width: int, seed: int) -> np.ndarray:
    """Colour gradients with stripes: smooth and sharp structure, different for every seed."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / max(width - 1, 1)
    g = 255 * ((y // (4 + seed)) % 2)
    b = 255 * (0.5 + 0.5 * np.sin((x + 2 * y) / (5.0 + seed)))
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def _write_video(path: str) -> None:
    """A white square crossing a dark background, as H.264 in mp4."""
    import av  # the data pipeline's video dependency, only needed for the synthetic clip

    h, w = VIDEO_SIZE
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(VIDEO_FRAMES):
            frame = np.full((h, w, 3), 30, dtype=np.uint8)
            left = i * (w - 16) // (VIDEO_FRAMES - 1)
            frame[h // 2 - 8 : h // 2 + 8, left : left + 16] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_media(directory: str) -> str:
    """Draw the synthetic images and video into `directory` (their dataset_dir); returns it."""
    os.makedirs(directory, exist_ok=True)
    for seed, (name, (h, w)) in enumerate(IMAGE_SIZES.items()):
        Image.fromarray(_image(h, w, seed)).save(os.path.join(directory, f"{name}.png"))
    _write_video(os.path.join(directory, "v.mp4"))
    return directory


def synthetic_samples() -> dict[str, dict]:
    """{kind: messages-format sample} of the synthetic set (media paths relative to `write_media`'s dir)."""
    out = {}
    for kind, user, answer, images, videos in SYNTHETIC:
        sample = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
        if images:
            sample["images"] = [f"{n}.png" for n in images]
        if videos:
            sample["videos"] = [f"{n}.mp4" for n in videos]
        out[kind] = sample
    return out


def _padded(encoded: list[dict], prompts: list[dict], pad_id: int, kind: str) -> Case:
    """Rows left-padded to one length; each row's first label is ignored (as in a packed row) so that no
    padding position predicts it."""
    batch = left_pad(encoded, pad_id)
    labels = torch.full_like(batch["input_ids"], IGNORE)
    for row, e in enumerate(encoded):
        n = e["labels"].numel()
        labels[row, -n:] = e["labels"]
        labels[row, -n] = IGNORE
    batch["labels"] = labels
    keep = batch.pop("attention_mask").bool()
    if len(encoded) > 1:
        batch["attention_mask"] = keep.long()
    return Case(kind, batch, keep, prompt=left_pad(prompts, pad_id))


def _packed(encoded: list[dict], kind: str) -> Case:
    row = pack(encoded)
    # The model shifts `labels` itself (per sample, by cu_seqlens), as transformers-style callers pass them.
    forward = {**row.model_inputs(), "labels": torch.cat([e["labels"].reshape(-1) for e in encoded])[None]}
    return Case(kind, forward, torch.ones_like(row.input_ids, dtype=torch.bool), parts=encoded)


def build_cases(
    processor, samples: dict[str, dict], dataset_dir: str | None, pad_id: int, batch: list[str], label: str
) -> list[Case]:
    """Every sample alone, then the samples named in `batch` as one left-padded batch and one packed row
    (their kind: `padded batch (label)`, `packed row (label)`)."""
    encoded, prompts = {}, {}
    for kind, sample in samples.items():
        encoded[kind] = processor.encode(sample, dataset_dir=dataset_dir)
        prompts[kind] = processor.encode(sample, dataset_dir=dataset_dir, add_generation_prompt=True)
    cases = [_padded([encoded[k]], [prompts[k]], pad_id, k) for k in samples]
    if len(batch) > 1:
        cases.append(
            _padded(
                [encoded[k] for k in batch], [prompts[k] for k in batch], pad_id, f"padded batch ({label})"
            )
        )
        cases.append(_packed([encoded[k] for k in batch], f"packed row ({label})"))
    return cases


def user_samples(samples: list[dict]) -> dict[str, dict]:
    """{kind: sample} for the user's samples: the kind names the file position and the media it holds."""
    out = {}
    for i, s in enumerate(samples):
        media = [m for m, key in (("image", "images"), ("video", "videos")) if s.get(key) or s.get(m)]
        where = f"{os.path.basename(s['_file'])} {s.get('_where', '')}".strip() if s.get("_file") else f"#{i}"
        out[f"sample {i} ({where}{', ' + '+'.join(media) if media else ''})"] = s
    return out
