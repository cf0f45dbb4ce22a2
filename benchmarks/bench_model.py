"""Forward+backward time and peak memory: native Qwen3-VL vs transformers, same config, same inputs, CPU.

    python benchmarks/bench_model.py [--iters 5] [--threads 2] [--smoke]

Each implementation runs in its own subprocess so peak RSS (ru_maxrss) is its own; the table prints the
median step time, the peak-RSS increase over the loaded model, and ours/transformers ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

CONFIG = dict(
    text_hidden=256,
    text_layers=4,
    heads=8,
    kv_heads=4,
    head_dim=32,
    mrope_section=(4, 6, 6),
    vision_hidden=128,
    vision_depth=4,
    vision_heads=4,
    deepstack=(0, 1, 2),
    num_position_embeddings=256,
)
SAMPLE = [40, ("image", 16, 16), 60, ("image", 12, 20), 80, ("video", 2, 8, 8), 60]
# `--smoke` (CI, every benchmark): the tests' tiny widths and a short sample; checks the code runs, measures
# nothing.
SMOKE_CONFIG = dict(text_hidden=64, text_layers=2, heads=4, kv_heads=2, head_dim=16, mrope_section=(2, 3, 3),
                    vision_hidden=32, vision_depth=2, vision_heads=2, deepstack=(0,), num_position_embeddings=64)  # fmt: skip
SMOKE_SAMPLE = [10, ("image", 4, 4), 10]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(impl: str, ckpt: str, iters: int, smoke: bool) -> dict:
    from model_inputs import build_sample, hf_kwargs, ours_kwargs

    inputs = build_sample(SMOKE_SAMPLE if smoke else SAMPLE, seed=0)
    labels = inputs["input_ids"].clone()
    if impl == "vlmtune":
        from vlmtune import load_pretrained

        model = load_pretrained(ckpt)
        kwargs = ours_kwargs(inputs)
    else:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(
            ckpt, attn_implementation="sdpa", dtype=torch.float32
        )
        kwargs = hf_kwargs(inputs)
    model.train()
    base = rss_mb()
    times = []
    for i in range(iters + 1):
        t = time.perf_counter()
        model(**kwargs, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)
        if i:  # first iteration warms up allocators and kernels
            times.append(time.perf_counter() - t)
    return {
        "ms": 1000 * statistics.median(times),
        "peak_mb": rss_mb() - base,
        "tokens": inputs["input_ids"].numel(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="one timed iteration: seconds (CI)")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "CKPT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.smoke:
        a.iters = 1
    torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(run_one(a.child[0], a.child[1], a.iters, a.smoke)))
        return
    from vlmtune.testing import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as ckpt:
        make_tiny_checkpoint(ckpt, seed=0, assets=False, **(SMOKE_CONFIG if a.smoke else CONFIG))
        res = {}
        for impl in ("transformers", "vlmtune"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--iters",
                    str(a.iters),
                    "--threads",
                    str(a.threads),
                    "--child",
                    impl,
                    ckpt,
                    *(["--smoke"] if a.smoke else []),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    t, o = res["transformers"], res["vlmtune"]
    print(f"Qwen3-VL small config, {o['tokens']} tokens (2 images + 1 video), fp32, CPU, {a.threads} threads")
    print(f"{'':24}{'transformers':>14}{'vlmtune':>12}{'ratio':>10}")
    print(f"{'fwd+bwd median (ms)':24}{t['ms']:>14.1f}{o['ms']:>12.1f}{o['ms'] / t['ms']:>10.2f}")
    print(
        f"{'peak RSS increase (MB)':24}{t['peak_mb']:>14.1f}{o['peak_mb']:>12.1f}{o['peak_mb'] / t['peak_mb']:>10.2f}"
    )


if __name__ == "__main__":
    main()
