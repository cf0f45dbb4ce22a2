"""Speed-ups that do not change an answer, on the CPU: `vlmtune eval`'s batched generation and the chat's
KV-cache reuse across turns.

    python benchmarks/bench_eval.py [--new-tokens 32] [--repeats 3] [--threads 1] [--smoke]

Eval: 16 prompts (8 with a photo of a different size, 8 text-only of different lengths) answered greedily
with no stop token, one at a time, in batches of 8 in dataset order, and in batches of 8 sorted by length
(what `vlmtune eval --batch-size 8` does); the answers are checked equal. Chat: an 8-turn conversation (a
448x448 photo in the first turn) with and without the cache of earlier turns, `--chat-tokens` per answer (1:
the time to the first token of every turn, which is what the cache changes; decoding costs the same either
way); the answers are checked equal. Medians over `--repeats`, runs interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from PIL import Image

from vlmtune import load_pretrained
from vlmtune.data import build_processor
from vlmtune.infer import ChatSession, generate, generate_batched, left_pad
from vlmtune.testing import make_tiny_checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import CONFIG, SMOKE_CONFIG  # noqa: E402  the same small model in every benchmark

PAD = 151643
TURNS = [
    "What is in the picture?", "What colour is it?", "Where could it be?", "Is it old?", "Who made it?",
    "What is left of it?", "And right of it?", "Thanks, bye.",
]  # fmt: skip


def photos(folder: str) -> list[str]:
    import skimage

    root = os.path.join(os.path.dirname(skimage.__file__), "data")
    out = []
    for k, name in enumerate(("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg") * 2):
        img = Image.open(os.path.join(root, name)).convert("RGB")
        img.thumbnail((96 + 32 * k, 96 + 32 * k))
        out.append(os.path.join(folder, f"{k}.png"))
        img.save(out[-1])
    return out


def prompts(processor, images: list[str]) -> list[dict]:
    story = "Tell me about the sea, the ships and the people on them. "
    samples = [
        {"messages": [{"role": "user", "content": "<image>Describe it."}], "images": [p]} for p in images
    ]
    samples += [{"messages": [{"role": "user", "content": story * (1 + 3 * k)}]} for k in range(8)]
    samples = [s for pair in zip(samples[:8], samples[8:]) for s in pair]  # dataset order: mixed lengths
    return [processor.encode(s, add_generation_prompt=True) for s in samples]


def eval_runs(model, encoded: list[dict], n: int) -> dict:
    def one():
        return [generate(model, e, max_new_tokens=n)[0] for e in encoded]

    def in_order():
        chunks = [encoded[k : k + 8] for k in range(0, len(encoded), 8)]
        return [t for c in chunks for t in generate(model, left_pad(c, PAD), max_new_tokens=n)]

    def sorted_batches():
        return generate_batched(model, encoded, batch_size=8, pad_token_id=PAD, max_new_tokens=n)

    return {
        "one at a time": one,
        "batches of 8, dataset order": in_order,
        "batches of 8, by length": sorted_batches,
    }


def chat_runs(model, processor, image: str, n: int) -> dict:
    def conversation(reuse: bool):
        session = ChatSession(model, processor, max_new_tokens=n, eos_token_ids=[], reuse_cache=reuse)
        return [session.ask(q, images=[image] if k == 0 else []) for k, q in enumerate(TURNS)]

    return {"chat, whole conversation each turn": lambda: conversation(False),
            "chat, cache of earlier turns kept": lambda: conversation(True)}  # fmt: skip


def measure(runs: dict, repeats: int) -> dict:
    results = {name: fn() for name, fn in runs.items()}  # warm-up, and the answers to compare
    first = next(iter(results.values()))
    assert all(r == first for r in results.values()), "a speed-up changed an answer"
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per eval answer")
    ap.add_argument(
        "--chat-tokens", type=int, default=1, help="tokens per chat answer (1: the time to the first token)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is stable on a busy machine)"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny model, 3 new tokens, one repeat: seconds (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.new_tokens, args.repeats = 3, 1
    torch.set_num_threads(args.threads)
    config = SMOKE_CONFIG if args.smoke else CONFIG
    with tempfile.TemporaryDirectory() as d:
        make_tiny_checkpoint(d, seed=0, **config)
        model = load_pretrained(d, dtype=torch.float32).eval()
        processor = build_processor(d, image_max_pixels=128 * 128)
        images = photos(d)
        encoded = prompts(processor, images)
        chat_processor = build_processor(d, image_max_pixels=448 * 448)  # a 196-token photo in turn 1
        with torch.no_grad():
            rows = {**measure(eval_runs(model, encoded, args.new_tokens), args.repeats)}
            rows.update(measure(chat_runs(model, chat_processor, images[-1], args.chat_tokens), args.repeats))
    print(
        f"\nCPU, {args.threads} thread(s), fp32, {config['text_layers']} layers x {config['text_hidden']} hidden, "
        f"vocab 151936; 16 eval prompts of {min(len(e['input_ids']) for e in encoded)}-"
        f"{max(len(e['input_ids']) for e in encoded)} tokens, {args.new_tokens} new tokens each; {len(TURNS)} chat "
        f"turns of {args.chat_tokens} new tokens\n"
    )
    print(f"{'run':38} {'seconds':>9} {'speed-up':>9}")
    base = {"e": rows["one at a time"], "c": rows["chat, whole conversation each turn"]}
    for name, seconds in rows.items():
        print(f"{name:38} {seconds:>9.2f} {base['c' if name.startswith('chat') else 'e'] / seconds:>9.2f}")


if __name__ == "__main__":
    main()
