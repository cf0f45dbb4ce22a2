"""`vlmtune train`, `vlmtune export`, `vlmtune plot`, `vlmtune demo`."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    from .config import describe_keys

    p = subparsers.add_parser(
        "train",
        help="fine-tune a Qwen3-VL checkpoint from a YAML config",
        description=(
            "Fine-tune from CONFIG.yaml; override any key with --section.key=value (value parsed as YAML).\n"
            "Single process: `vlmtune train cfg.yaml`. Several: `torchrun --nproc_per_node N "
            "$(which vlmtune) train cfg.yaml`.\nRerunning the same command resumes from output_dir's latest "
            "checkpoint. Keys and defaults:\n\n" + describe_keys()
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key=value overrides")
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "export",
        help="write a training checkpoint in Hugging Face format",
        description="Load a training checkpoint (a step directory, or a run directory: its latest) and write "
        "HF safetensors + config + tokenizer files to --out.",
    )
    p.add_argument("checkpoint", help="checkpoint step directory, or a run's output_dir (uses its latest)")
    p.add_argument("--out", required=True, help="output directory for the Hugging Face checkpoint")
    p.set_defaults(func=run_export)

    p = subparsers.add_parser("plot", help="plot loss and lr curves of a run", description="Writes a PNG of "
                              "loss (and validation loss) and learning rate against step from metrics.jsonl.")  # fmt: skip
    p.add_argument("output_dir", help="a training run's output_dir (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default: OUTPUT_DIR/loss.png)")
    p.set_defaults(func=run_plot)

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
    p.set_defaults(func=run_demo)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def run_train(args) -> int:
    from vlmtune.data import DataConfigError

    from .config import TrainConfigError, load
    from .trainer import train

    try:
        cfg = load(args.config, args.overrides)
    except (TrainConfigError, DataConfigError) as e:
        return _fail(f"{e}\n(see `vlmtune train --help` for every key and its default)")
    summary = train(cfg)
    print(f"done: step {summary['step']}, loss {summary['loss']}, outputs in {summary['output_dir']}")
    return 0


def run_export(args) -> int:
    from .checkpoint import CheckpointLoadError
    from .export import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out)
    except CheckpointLoadError as e:
        return _fail(str(e))
    print(f"wrote Hugging Face checkpoint to {out}")
    return 0


def run_plot(args) -> int:
    from .metrics import plot

    try:
        print(plot(args.output_dir, args.out))
    except FileNotFoundError as e:
        return _fail(str(e))
    return 0


def run_demo(args) -> int:
    from .demo import run_demo as demo

    if args.steps < 1:
        return _fail("--steps must be >= 1")
    demo(args.out, steps=args.steps, n_train=args.train_samples, n_eval=args.eval_samples, seed=args.seed)
    return 0
