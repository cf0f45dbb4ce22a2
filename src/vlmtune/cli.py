"""`vlmtune <command>`: each command is a thin layer over the library.

Each feature area registers its own subcommands from a `cli` module (`vlmtune/<area>/cli.py`) exposing
`register(subparsers)`; a command's parser sets `func` to the function that runs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Feature areas whose `cli.register(subparsers)` adds commands, in `--help` order.
COMMAND_MODULES = (
    "vlmtune.train.cli",
    "vlmtune.train.plan_cli",
    "vlmtune.infer.cli",
    "vlmtune.data.cli",
    "vlmtune.models.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmtune",
        description="Fine-tune Qwen3-VL vision-language models, from Hugging Face weights back to Hugging Face weights.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # area not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
