"""`vlmtune <command>`: each command is a thin layer over the library.

Each area registers its own subcommands from its `cli` module (`register(subparsers)`); a command's parser
sets `func` to the function that runs it. Every `VlmtuneError` (a bad config, dataset, checkpoint or layout)
ends as one `error: <message>` line on stderr and exit status 2 on every rank (printed once when every rank
holds it); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vlmtune import demo
from vlmtune.checkpoint import cli as checkpoint_cli
from vlmtune.data import cli as data_cli
from vlmtune.errors import NODE, WORLD, ConfigError, VlmtuneError
from vlmtune.infer import cli as infer_cli
from vlmtune.infer import verify_cli
from vlmtune.train import cli as train_cli
from vlmtune.train import mindspeed_cli, plan_cli

# Areas whose `register(subparsers)` adds commands, in `--help` order.
COMMAND_MODULES = (train_cli, plan_cli, checkpoint_cli, infer_cli, verify_cli, data_cli, mindspeed_cli, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmtune",
        description="Fine-tune Qwen3-VL vision-language models, from Hugging Face weights back to Hugging Face weights.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def setup_logging() -> None:
    """vlmtune's own log lines to stdout, plain; INFO on rank 0, warnings only on the other ranks."""
    logger = logging.getLogger("vlmtune")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    setup_logging()
    try:
        return int(args.func(args) or 0)
    except VlmtuneError as e:
        if not _quiet_rank(e):
            hint = f"\n(see `vlmtune {args.command} --help`)" if isinstance(e, ConfigError) else ""
            print(f"error: {e}{hint}", file=sys.stderr, flush=True)  # stderr escapes what it cannot encode
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _quiet_rank(error: VlmtuneError) -> bool:
    """Under torchrun an error every rank holds is printed once: by rank 0 when the ranks agreed on it, by
    each node's local rank 0 when every rank found it in the same files before the process group existed."""
    scope = getattr(error, "every_rank", None)
    if scope == WORLD:
        return os.environ.get("RANK", "0") != "0"
    if scope == NODE:
        return os.environ.get("LOCAL_RANK", "0") != "0"
    return False


if __name__ == "__main__":
    sys.exit(main())
