"""`vlmtune demo`: fine-tune a tiny random Qwen3-VL on synthetic visual questions, on the CPU, in minutes.

Everything is generated locally: a tiny random checkpoint with the real Qwen tokenizer, and images of 1-3
shapes (circle, square, triangle) of one colour (red, green, blue, yellow) drawn with PIL, each asked one
of three questions (shape, colour, count) in the messages format. Held-out images measure exact-match
accuracy of the generated answers before and after training.
"""

from __future__ import annotations

import json
import os
import random

import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from vlmtune.data import build_processor
from vlmtune.errors import ConfigError
from vlmtune.infer import evaluate, load_model
from vlmtune.testing import make_tiny_checkpoint
from vlmtune.train.config import from_dict
from vlmtune.train.trainer import train

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
QUESTIONS = {"shape": "What shape?", "colour": "What colour?", "count": "How many shapes?"}
IMAGE_SIZE = 96
# Chance accuracy when the question type is known: mean of 1/3 (shape), 1/4 (colour), 1/3 (count).
CHANCE = (1 / 3 + 1 / 4 + 1 / 3) / 3

# The tiny model: small enough for a CPU, large enough to learn shapes, colours and counts.
MODEL_SIZE = dict(
    text_hidden=128, text_layers=2, heads=4, kv_heads=2, head_dim=32, mrope_section=(4, 6, 6),
    vision_hidden=64, vision_depth=2, vision_heads=2, deepstack=(0,), num_position_embeddings=64,
    tie_word_embeddings=True,
)  # fmt: skip


def draw(shape: str, colour: str, count: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 245))
    d = ImageDraw.Draw(img)
    cell = IMAGE_SIZE // 3
    for k in rng.sample(range(9), count):  # distinct cells of a 3x3 grid: shapes never overlap
        r = rng.randint(11, 14)
        cx = (k % 3) * cell + cell // 2 + rng.randint(-2, 2)
        cy = (k // 3) * cell + cell // 2 + rng.randint(-2, 2)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[colour]
        if shape == "circle":
            d.ellipse(box, fill=fill)
        elif shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def make_dataset(out_dir: str, n_train: int, n_eval: int, seed: int = 0) -> tuple[str, str]:
    """Writes images and `train.json` / `heldout.json` (messages format); returns the two paths.

    A training image is asked all three questions in one conversation (in random order; every answer is
    trained), a held-out image one question: the model must read the image to answer it."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    splits = {"train": [], "heldout": []}
    for i in range(n_train + n_eval):
        shape, colour, count = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.randint(1, 3)
        answers = {"shape": shape, "colour": colour, "count": str(count)}
        kinds = rng.sample(list(QUESTIONS), 3) if i < n_train else [rng.choice(list(QUESTIONS))]
        name = f"images/{i:05d}.png"
        draw(shape, colour, count, rng).save(os.path.join(out_dir, name))
        messages = []
        for k, kind in enumerate(kinds):
            messages.append({"role": "user", "content": ("<image>" if k == 0 else "") + QUESTIONS[kind]})
            messages.append({"role": "assistant", "content": answers[kind]})
        sample = {"id": f"vqa-{i:05d}", "messages": messages, "images": [name]}
        splits["train" if i < n_train else "heldout"].append(sample)
    paths = []
    for split, samples in splits.items():
        path = os.path.join(out_dir, f"{split}.json")
        with open(path, "w") as f:
            json.dump(samples, f, indent=1)
        paths.append(path)
    return paths[0], paths[1]


def demo_config(out: str, base: str, data_dir: str, steps: int) -> dict:
    return {
        "output_dir": out,
        "model": {"init_from_hf": base},
        "optim": {"lr": 3e-3, "weight_decay": 0.01, "warmup_steps": max(1, steps // 10), "min_lr": 1e-4},
        "data": {"dataset": "train.json", "dataset_dir": data_dir, "num_workers": 1},
        "train": {"train_iters": steps, "micro_batch_tokens": 1024, "seed": 0},
        "checkpoint": {"save_interval": 0, "keep_last": 1, "save_hf": True, "auto_resume": False},
        "logging": {"log_interval": 5, "tensorboard": True},
    }


def _native_resolution(base: str) -> None:
    """Keep the 96x96 images at their size (6x6 patches, 9 visual tokens) instead of upscaling them to the
    processor's default minimum; written into the checkpoint so training and evaluation agree."""
    path = os.path.join(base, "preprocessor_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["size"]["shortest_edge"] = IMAGE_SIZE * IMAGE_SIZE
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def _fan_in_init(base: str, seed: int) -> None:
    """Re-draw every weight matrix with std 1/sqrt(fan_in) (embeddings and norms keep theirs).

    transformers initialises with std 0.02, meant for wide models: in a 64-128 wide one the image barely
    moves the answer logits at first, and the model settles on the answer prior before it learns to look."""
    path = os.path.join(base, "model.safetensors")
    tensors = load_file(path)
    g = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if t.ndim >= 2 and "embed_tokens" not in name and "pos_embed" not in name:
            fan_in = t[0].numel()
            tensors[name] = torch.randn(t.shape, generator=g, dtype=t.dtype) / fan_in**0.5
    save_file(tensors, path, metadata={"format": "pt"})


def accuracy(model_dir: str, samples: list[dict], data_dir: str) -> dict:
    model = load_model(model_dir)
    processor = build_processor(model_dir)
    return evaluate(
        model, processor, samples, dataset_dir=data_dir, generate=True, max_new_tokens=4, progress=True
    )


def run_demo(out: str, steps: int = 250, n_train: int = 3000, n_eval: int = 150, seed: int = 0) -> dict:
    out = os.path.abspath(out)
    base, data_dir = os.path.join(out, "base"), os.path.join(out, "data")
    os.makedirs(base, exist_ok=True)
    print(f"[1/4] tiny random Qwen3-VL with the real Qwen tokenizer -> {base}", flush=True)
    make_tiny_checkpoint(base, seed=seed, **MODEL_SIZE)
    _native_resolution(base)
    _fan_in_init(base, seed)
    print(
        f"[2/4] synthetic shapes/colours/counts VQA: {n_train} train + {n_eval} held-out -> {data_dir}",
        flush=True,
    )
    _, heldout_path = make_dataset(data_dir, n_train, n_eval, seed)
    with open(heldout_path) as f:
        heldout = json.load(f)
    before = accuracy(base, heldout, data_dir)
    print(
        f"[3/4] training {steps} steps on the CPU (held-out accuracy before: {before['exact_match']:.3f})",
        flush=True,
    )
    cfg = from_dict(demo_config(out, base, data_dir, steps))
    summary = train(cfg)
    print("[4/4] evaluating the exported model on the held-out questions", flush=True)
    after = accuracy(os.path.join(out, "hf"), heldout, data_dir)
    result = {
        "accuracy_before": before["exact_match"],
        "accuracy_after": after["exact_match"],
        "chance": CHANCE,
        "heldout_samples": len(heldout),
        "train_steps": summary["step"],
        "final_loss": summary["loss"],
        "heldout_loss_before": before["loss"],
        "heldout_loss_after": after["loss"],
    }
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    example, pred = heldout[0], after["predictions"][0]
    print(f"\nheld-out image: {os.path.join(data_dir, example['images'][0])}")
    print(f"question: {example['messages'][0]['content'].replace('<image>', '')}")
    print(f"model answer: {pred['prediction']!r}   (reference: {pred['reference']!r})")
    print(
        f"accuracy on {len(heldout)} held-out questions: {result['accuracy_before']:.3f} before -> "
        f"{result['accuracy_after']:.3f} after (chance ~{CHANCE:.2f})"
    )
    print(f"wrote {out}/metrics.jsonl, {out}/eval.json, {out}/hf/, {summary.get('plot')}")
    return result


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a tiny Qwen3-VL on synthetic visual questions on the CPU (a few minutes)",
        description="Builds a tiny random Qwen3-VL with the real Qwen tokenizer and a synthetic shapes/colours/"
        "counts VQA dataset, trains it, and writes DIR/metrics.jsonl, DIR/eval.json (held-out accuracy "
        "before/after), DIR/hf/ and DIR/loss.png.",
    )
    p.add_argument("--out", required=True, help="directory for everything the demo writes")
    p.add_argument("--steps", type=int, default=250, help="optimizer steps (default 250)")
    p.add_argument(
        "--train-samples", type=int, default=3000, help="synthetic training questions (default 3000)"
    )
    p.add_argument("--eval-samples", type=int, default=150, help="held-out questions (default 150)")
    p.add_argument("--seed", type=int, default=0, help="seed for the model and the data (default 0)")
    p.set_defaults(func=_run_demo_command)


def _run_demo_command(args) -> int:
    for name in ("steps", "train_samples", "eval_samples"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    run_demo(args.out, steps=args.steps, n_train=args.train_samples, n_eval=args.eval_samples, seed=args.seed)
    return 0
