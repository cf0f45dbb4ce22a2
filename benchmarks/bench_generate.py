"""Generation speed: vlmtune's KV-cache `generate` vs transformers' `generate`, same checkpoint, same prompts, CPU.

    python benchmarks/bench_generate.py [--new-tokens 64] [--repeats 5] [--threads 1] [--smoke]

Both run greedy with no stop token, so every row produces exactly `--new-tokens` tokens. For each batch
shape the prefill time is the time to the first token (`max_new_tokens=1`), and decode speed is
`batch * (N - 1) / (time(N) - time(1))` generated tokens per second. Medians over `--repeats`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from vlmtune import load_pretrained
from vlmtune.infer import generate, left_pad
from vlmtune.testing import make_tiny_checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import CONFIG, SMOKE_CONFIG  # noqa: E402  the same small model in every benchmark

PAD, IMAGE, VIDEO = 151643, 151655, 151656


def prompt(tok, text: str, image=None, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    block, media = "", {}
    if image is not None:
        h, w = image
        block = "<|vision_start|>" + "<|image_pad|>" * (h * w // 4) + "<|vision_end|>"
        media = {
            "pixel_values": torch.randn(h * w, 1536, generator=g),
            "image_grid_thw": torch.tensor([[1, h, w]]),
        }
    ids = tok(f"<|im_start|>user\n{block}{text}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    return {"input_ids": torch.tensor(ids), **media}


def cases(tok) -> dict[str, dict]:
    long_text = "Describe every object in the picture and say how they relate to each other. " * 3
    single = prompt(tok, long_text, image=(16, 16))
    batch = left_pad(
        [
            prompt(tok, "What is this?", image=(16, 16), seed=1),
            prompt(tok, long_text, image=(12, 20), seed=2),
            prompt(tok, "Tell me a story about a cat.", seed=3),
            prompt(tok, long_text, image=(8, 8), seed=4),
        ],
        PAD,
    )
    return {"1 prompt, image": single, "4 prompts, left-padded": batch}


def run_ours(model, batch, n):
    generate(model, batch, max_new_tokens=n, eos_token_ids=[])


def run_hf(model, batch, n):
    ids = batch["input_ids"]
    ids = ids[None] if ids.ndim == 1 else ids
    types = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "position_ids")}
    model.generate(
        input_ids=ids, mm_token_type_ids=types, **extra, max_new_tokens=n, do_sample=False, pad_token_id=PAD
    )


def timed(fn, model, batch, n: int) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        fn(model, batch, n)
    return time.perf_counter() - t


def measure(impls: dict, batch: dict, n: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (time to 1 token, time to n tokens) per implementation, runs interleaved so that load from
    other processes hits both alike."""
    for model, fn in impls.values():
        fn(model, batch, 2)  # warm-up
    times = {name: ([], []) for name in impls}
    for _ in range(repeats):
        for name, (model, fn) in impls.items():
            times[name][0].append(timed(fn, model, batch, 1))
            times[name][1].append(timed(fn, model, batch, n))
    return {name: (statistics.median(a), statistics.median(b)) for name, (a, b) in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is stable on a busy machine)"
    )
    ap.add_argument("--smoke", action="store_true", help="4 new tokens, one repeat: seconds (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.new_tokens, args.repeats = 4, 1
    torch.set_num_threads(args.threads)
    n = args.new_tokens
    config = SMOKE_CONFIG if args.smoke else CONFIG
    with tempfile.TemporaryDirectory() as d:
        make_tiny_checkpoint(d, seed=0, **config)
        tok = AutoTokenizer.from_pretrained(d)
        ours = load_pretrained(d, dtype=torch.float32).eval()
        hf = AutoModelForImageTextToText.from_pretrained(
            d, attn_implementation="sdpa", dtype=torch.float32
        ).eval()
        hf.generation_config.eos_token_id = None  # run all N steps, as ours does with no stop token
        impls = {"vlmtune": (ours, run_ours), "transformers": (hf, run_hf)}
        rows = []
        for name, batch in cases(tok).items():
            bsz = 1 if batch["input_ids"].ndim == 1 else batch["input_ids"].shape[0]
            length = batch["input_ids"].shape[-1]
            res = {
                impl: (t1, bsz * (n - 1) / (tn - t1))
                for impl, (t1, tn) in measure(impls, batch, n, args.repeats).items()
            }
            rows.append((f"{name} (L={length})", res))
    print(
        f"\nCPU, {args.threads} threads, fp32, {n} new tokens, config {config['text_layers']} layers x "
        f"{config['text_hidden']} hidden, vocab 151936\n"
    )
    header = f"{'case':34} {'prefill ms':>22} {'ratio':>6} {'decode tok/s':>24} {'ratio':>6}"
    print(header)
    print(f"{'':34} {'vlmtune / transformers':>22} {'':>6} {'vlmtune / transformers':>24}")
    print("-" * len(header))
    for name, res in rows:
        (p_o, d_o), (p_h, d_h) = res["vlmtune"], res["transformers"]
        print(
            f"{name:34} {p_o * 1e3:10.1f} / {p_h * 1e3:9.1f} {p_o / p_h:6.2f} "
            f"{d_o:11.1f} / {d_h:10.1f} {d_o / d_h:6.2f}"
        )


if __name__ == "__main__":
    main()
