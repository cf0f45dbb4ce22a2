"""Train-step throughput and peak memory on the CPU: vlmtune (packed micro-batches, chunked loss) vs the way
transformers users usually train (padded batches, full logits, `outputs.loss`), on the same samples.

    python benchmarks/bench_train.py [--samples 96] [--steps 4] [--threads 2] [--smoke]

Each side runs in its own process so peak RSS is its own. Tokens/s counts real (non-padding) tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import SMOKE_CONFIG  # noqa: E402  the tests' tiny widths for --smoke

SIZE = dict(text_hidden=256, text_layers=4, heads=8, kv_heads=4, head_dim=32, mrope_section=(4, 6, 6),
            vision_hidden=128, vision_depth=4, vision_heads=4, deepstack=(0, 1))  # fmt: skip


def prepare(work: str, n: int, size: dict) -> None:
    from vlmtune.demo import _native_resolution, make_dataset
    from vlmtune.testing import make_tiny_checkpoint

    make_tiny_checkpoint(os.path.join(work, "base"), seed=0, **size)
    _native_resolution(os.path.join(work, "base"))
    make_dataset(os.path.join(work, "data"), n_train=n, n_eval=1, seed=0)


def encoded(work: str):
    from vlmtune.data import build_processor

    base, data = os.path.join(work, "base"), os.path.join(work, "data")
    processor = build_processor(base)
    samples = json.load(open(os.path.join(data, "train.json")))
    return processor, [processor.encode(s, data) for s in samples]


def run_ours(work: str, steps: int, budget: int) -> dict:
    import torch

    from vlmtune import load_pretrained
    from vlmtune.data import pack
    from vlmtune.data.loader import first_fit_decreasing
    from vlmtune.train.step import DataParallelStep, TrainModule, finish_step

    _, enc = encoded(work)
    lengths = [e["input_ids"].numel() for e in enc]
    bins = first_fit_decreasing(list(range(len(enc))), lengths, budget)
    batches = [pack([enc[i] for i in b]) for b in bins]
    model = load_pretrained(os.path.join(work, "base"))
    strategy = DataParallelStep(TrainModule(model), torch.device("cpu"), dp_size=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(micro, s):
        loss, tokens, labels = strategy.forward_backward(micro)
        finish_step(opt, micro, loss, tokens, labels, clip_grad=1.0, on_nan="stop", step=s)

    step(batches[:1], 0)  # warm-up
    t, tokens = time.perf_counter(), 0
    for s in range(steps):
        step(batches, s + 1)
        tokens += sum(b.num_tokens for b in batches)
    return {"tokens_per_s": tokens / (time.perf_counter() - t), "micro_batches": len(batches)}


def run_hf(work: str, steps: int, batch_size: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    processor, enc = encoded(work)
    model = AutoModelForImageTextToText.from_pretrained(
        os.path.join(work, "base"), attn_implementation="sdpa"
    )
    model.train()
    image_id = model.config.image_token_id
    pad = processor.tokenizer.pad_token_id
    batches = []
    for k in range(0, len(enc), batch_size):
        group = enc[k : k + batch_size]
        n = max(e["input_ids"].numel() for e in group)
        ids = torch.full((len(group), n), pad)
        labels = torch.full((len(group), n), -100)
        mask = torch.zeros((len(group), n), dtype=torch.long)
        for i, e in enumerate(group):
            L = e["input_ids"].numel()
            ids[i, :L], labels[i, :L], mask[i, :L] = e["input_ids"], e["labels"], 1
        batches.append(
            {
                "input_ids": ids, "labels": labels, "attention_mask": mask,
                "pixel_values": torch.cat([e["pixel_values"] for e in group]),
                "image_grid_thw": torch.cat([e["image_grid_thw"] for e in group]),
                "mm_token_type_ids": (ids == image_id).long(),
            }
        )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(bs):
        for b in bs:
            (model(**b).loss / len(bs)).backward()  # the usual gradient accumulation
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    step(batches[:1])
    t, tokens = time.perf_counter(), 0
    for _ in range(steps):
        step(batches)
        tokens += sum(int(b["attention_mask"].sum()) for b in batches)
    return {"tokens_per_s": tokens / (time.perf_counter() - t), "micro_batches": len(batches)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=int, default=2048, help="vlmtune micro-batch token budget")
    ap.add_argument("--batch-size", type=int, default=16, help="transformers padded batch size")
    ap.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="8 samples, one timed step: seconds (CI)")
    a = ap.parse_args()
    if a.smoke:
        a.samples, a.steps, a.batch_size = 8, 1, 4
    if a.side:
        import torch

        torch.set_num_threads(a.threads)
        torch.manual_seed(0)
        fn = run_ours if a.side == "ours" else run_hf
        out = fn(a.work, a.steps, a.budget if a.side == "ours" else a.batch_size)
        out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(out))
        return
    size = SMOKE_CONFIG if a.smoke else SIZE
    with tempfile.TemporaryDirectory() as work:
        prepare(work, a.samples, size)
        rows = {}
        for side in ("hf", "ours"):
            cmd = [sys.executable, __file__, "--side", side, "--work", work, "--steps", str(a.steps),
                   "--threads", str(a.threads), "--budget", str(a.budget), "--batch-size", str(a.batch_size)]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[side] = json.loads(res.stdout.strip().splitlines()[-1])
    hf, ours = rows["hf"], rows["ours"]
    print(f"{a.samples} samples/step, {a.steps} timed steps, {a.threads} threads; model: {size}")
    print(f"{'':28}{'transformers (padded)':>24}{'vlmtune (packed)':>20}{'ratio':>10}")
    print(f"{'micro-batches per step':28}{hf['micro_batches']:>24}{ours['micro_batches']:>20}")
    print(f"{'tokens/s (real tokens)':28}{hf['tokens_per_s']:>24.0f}{ours['tokens_per_s']:>20.0f}"
          f"{ours['tokens_per_s'] / hf['tokens_per_s']:>9.2f}x")  # fmt: skip
    print(f"{'peak RSS (GB)':28}{hf['peak_rss_gb']:>24.2f}{ours['peak_rss_gb']:>20.2f}"
          f"{ours['peak_rss_gb'] / hf['peak_rss_gb']:>9.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
