"""`vlmtune train` and `vlmtune plot`."""

from __future__ import annotations

import argparse

from vlmtune.errors import before_process_group

from .config import describe_keys, load
from .metrics import plot
from .trainer import train


def register(subparsers) -> None:
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
        "plot",
        help="plot loss and lr curves of a run",
        description="Writes a PNG of loss (and validation loss) and learning rate against step from metrics.jsonl.",
    )
    p.add_argument("output_dir", help="a training run's output_dir (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default: OUTPUT_DIR/loss.png)")
    p.set_defaults(func=run_plot)


def run_train(args) -> int:
    with before_process_group():  # the same file on every rank: one message, not one per rank
        cfg = load(args.config, args.overrides)
    summary = train(cfg)
    print(f"done: step {summary['step']}, loss {summary['loss']}, outputs in {summary['output_dir']}")
    return 0


def run_plot(args) -> int:
    print(plot(args.output_dir, args.out))
    return 0
