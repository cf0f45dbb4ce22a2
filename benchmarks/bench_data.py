"""Samples/s of `Processor.encode` on real photos vs the transformers pipeline on the same files, CPU.

    python benchmarks/bench_data.py [--repeats 5] [--threads 2] [--max-pixels 1003520] [--smoke]

Each sample is a one-image question and answer over the scikit-image photos. The transformers side does the
same work as `Qwen3VLProcessor` for images (its processor class cannot be built here without torchvision):
PIL `Qwen2VLImageProcessorPil` (patch 16, merge 2, temporal 2, mean/std 0.5), the chat template, the pad
expansion and one tokenizer call. Both sides open the files themselves. `measure` (header-only length, what
the packer uses) is timed as well.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="passes over the photo set (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (DataLoader workers run with 1)")
    ap.add_argument("--max-pixels", type=int, default=1003520, help="image_max_pixels for both sides")
    ap.add_argument("--smoke", action="store_true", help="two small photos, one pass: seconds (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.repeats, args.max_pixels = 1, 65536
    torch.set_num_threads(args.threads)

    import skimage
    from PIL import Image, ImageOps
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlmtune.data import build_processor
    from vlmtune.testing import write_assets

    root = os.path.join(os.path.dirname(skimage.__file__), "data")
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "motorcycle_left.png"]
    names += ["motorcycle_right.png", "hubble_deep_field.jpg", "immunohistochemistry.png", "retina.jpg"]
    names = [n for n in names if os.path.exists(os.path.join(root, n))][: 2 if args.smoke else None]
    samples = [
        {
            "messages": [
                {"role": "user", "content": "<image>\nDescribe this picture in one sentence."},
                {"role": "assistant", "content": "It is a photo from the scikit-image collection."},
            ],
            "images": [n],
        }
        for n in names
    ]
    ckpt = tempfile.mkdtemp()
    write_assets(ckpt)
    ours = build_processor(ckpt, image_max_pixels=args.max_pixels)
    tok = AutoTokenizer.from_pretrained(ckpt)
    hf_images = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"shortest_edge": 65536, "longest_edge": args.max_pixels},
    )

    def hf_encode(sample):
        with Image.open(os.path.join(root, sample["images"][0])) as img:
            img = ImageOps.exif_transpose(img)
            pix = hf_images(images=[img], return_tensors="pt")
        conv = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": sample["messages"][0]["content"][7:]},
                ],
            },
            {"role": "assistant", "content": sample["messages"][1]["content"]},
        ]
        text = tok.apply_chat_template(conv, tokenize=False)
        n = int(pix["image_grid_thw"][0].prod()) // 4
        text = text.replace("<|image_pad|>", "<|image_pad|>" * n, 1)
        return tok(text, add_special_tokens=False, return_tensors="pt"), pix

    def rate(fn):
        fn(samples[0])  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for s in samples:
                fn(s)
            times.append(time.perf_counter() - t)
        return len(samples) / statistics.median(times)

    hf = rate(hf_encode)
    enc = rate(lambda s: ours.encode(s, root))
    meas = rate(lambda s: ours.measure(s, root))
    tokens = sum(ours.measure(s, root)[0] for s in samples) / len(samples)
    print(
        f"{len(samples)} photos, image_max_pixels {args.max_pixels}, mean {tokens:.0f} tokens/sample, {args.threads} threads"
    )
    print(f"{'pipeline':<44}{'samples/s':>12}{'vs transformers':>18}")
    print(f"{'transformers (PIL image processor + template)':<44}{hf:>12.1f}{1.0:>18.2f}")
    print(f"{'vlmtune encode (pixels + labels + positions)':<44}{enc:>12.1f}{enc / hf:>18.2f}")
    print(f"{'vlmtune measure (header-only length)':<44}{meas:>12.1f}{meas / hf:>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
