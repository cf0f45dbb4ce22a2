"""`vlmtune chat` and `vlmtune eval`."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from vlmtune.data import DataConfig, build_processor, load_samples
from vlmtune.errors import ConfigError, DataError, VlmtuneError
from vlmtune.generation.answers import DEFAULT_METRICS, METRICS, check_metrics
from vlmtune.generation.sampling import SamplingOptions
from vlmtune.options import cli_number

from .chat import ChatSession
from .evaluate import evaluate
from .load import load_model, pick_device, processor_dir

POSITIVE = cli_number(int, low=1)
HELP_MODEL = "Hugging Face checkpoint directory, or a training checkpoint directory from `vlmtune train`"
HELP_PROCESSOR = (
    "directory with the tokenizer and preprocessor configs (default: the model directory, or the Hugging Face "
    "directory a training checkpoint was initialised from)"
)


def register(subparsers) -> None:
    chat = subparsers.add_parser(
        "chat",
        help="talk to a model (one question, or an interactive multi-turn chat)",
        description=(
            "Answer PROMPT and exit, or without PROMPT start an interactive chat. Interactive commands: "
            "'/image PATH' attaches an image to the next question, '/video PATH' a video, '/reset' starts a "
            "new conversation, '/quit' exits. Answers stream to a terminal; when stdout is not a terminal "
            "only the answer text is printed."
        ),
    )
    chat.add_argument("prompt", nargs="?", help="the question; omit it for an interactive chat")
    _model_args(chat)
    chat.add_argument(
        "--image", action="append", default=[], metavar="FILE", help="attach an image (repeatable)"
    )
    chat.add_argument("--video", metavar="FILE", help="attach a video")
    chat.add_argument("--system", metavar="TEXT", help="system prompt")
    chat.add_argument(
        "--max-new-tokens", type=POSITIVE, default=512, metavar="N", help="answer length limit (512)"
    )
    chat.add_argument(
        "--temperature", type=cli_number(float, low=0), default=0.0, metavar="T", help="0 = greedy (default)"
    )
    chat.add_argument(
        "--top-p", type=cli_number(float, above=0, high=1), default=1.0, metavar="P",
        help="nucleus sampling mass in (0, 1] (1 = off)",
    )  # fmt: skip
    chat.add_argument(
        "--top-k",
        type=cli_number(int, low=0),
        default=0,
        metavar="K",
        help="sample among the K likeliest (0 = off)",
    )
    chat.add_argument(
        "--repetition-penalty", type=cli_number(float, above=0), default=1.0, metavar="R",
        help="penalise seen tokens (1 = off)",
    )  # fmt: skip
    chat.add_argument("--seed", type=cli_number(int, low=0), default=None, help="random seed for sampling")
    _template_args(chat, system=False)
    chat.set_defaults(func=run_chat)

    _register_eval(subparsers)


def _register_eval(subparsers) -> None:
    ev = subparsers.add_parser(
        "eval",
        help="loss / perplexity over assistant tokens, optionally answer accuracy, as a JSON report",
        description=(
            "Token-mean loss and perplexity over the assistant tokens of a dataset (messages or LLaVA format; "
            "JSON, JSONL, Parquet or a datasets.save_to_disk directory). With --generate, the assistant turn "
            "after each sample's last user turn is the reference: the model answers the conversation up to that "
            "user turn (greedy, --batch-size prompts at a time, sorted by length) and --metrics are reported "
            "(on lower-cased answers, whitespace and trailing punctuation normalised)."
        ),
    )
    _model_args(ev)
    ev.add_argument(
        "--dataset", required=True, help="comma-separated JSON / JSONL / Parquet files, globs or directories"
    )
    ev.add_argument("--dataset-dir", default=".", help="base directory for relative media paths (.)")
    ev.add_argument(
        "--max-samples", type=POSITIVE, default=None, metavar="N", help="first N samples of each dataset"
    )
    ev.add_argument("--generate", action="store_true", help="also generate answers and score their accuracy")
    ev.add_argument(
        "--max-new-tokens", type=POSITIVE, default=32, metavar="N", help="answer length limit (32)"
    )
    ev.add_argument(
        "--batch-size", type=POSITIVE, default=8, metavar="N", help="prompts generated together (8)"
    )
    ev.add_argument(
        "--metrics", type=_metric_list, default=list(DEFAULT_METRICS), metavar="M,M",
        help=f"answer metrics with --generate, comma-separated: {', '.join(METRICS)} (default exact,contains)",
    )  # fmt: skip
    ev.add_argument(
        "--on-bad-sample",
        choices=["skip", "error"],
        default="skip",
        help="skip unusable samples and report them (default) or stop at the first",
    )
    ev.add_argument("--json", metavar="OUT", help="write the report (with per-sample predictions) here")
    _template_args(ev, system=True)
    ev.set_defaults(func=run_eval)


def _template_args(p: argparse.ArgumentParser, *, system: bool) -> None:
    """Options of the chat template: `--enable-thinking` and (eval; chat has its own) `--system`."""
    p.add_argument(
        "--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
        help="passed to the chat template as enable_thinking (Qwen3 thinking templates; default: the template's)",
    )  # fmt: skip
    if system:
        p.add_argument("--system", metavar="TEXT", help="system prompt for samples that have none")


def _processor_options(args) -> dict:
    """build_processor options from `_template_args`."""
    options = {"enable_thinking": args.enable_thinking}
    if getattr(args, "func", None) is run_eval:
        options["system_prompt"] = args.system
    return options


def _metric_list(text: str) -> list[str]:
    try:
        return check_metrics([m.strip() for m in text.split(",") if m.strip()])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH", help=HELP_MODEL)
    p.add_argument("--processor", metavar="DIR", help=HELP_PROCESSOR)
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter to put on the model (docs/lora.md)")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)"
    )
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's"
    )


def _load(args):
    model = load_model(args.model, dtype=args.dtype, device=pick_device(args.device), adapter=args.adapter)
    processor = build_processor(
        args.processor or processor_dir(model, args.model), **_processor_options(args)
    )
    return model, processor


def run_chat(args) -> int:
    for path in [*args.image, *([args.video] if args.video else [])]:
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such file")
    model, processor = _load(args)
    session = ChatSession(
        model,
        processor,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingOptions(args.temperature, args.top_p, args.top_k, args.repetition_penalty),
        generator=torch.Generator().manual_seed(args.seed) if args.seed is not None else None,
    )
    videos = [args.video] if args.video else []
    if args.prompt is not None:
        tty = sys.stdout.isatty()
        answer = session.ask(args.prompt, images=args.image, videos=videos, on_text=_echo if tty else None)
        print("" if tty else answer, flush=True)
        return 0
    return _interactive(session, args.image, videos)


def _echo(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _interactive(session, images: list[str], videos: list[str]) -> int:
    print("Interactive chat. /image PATH, /video PATH attach media to the next question; /reset; /quit.")
    images, videos = list(images), list(videos)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            images, videos = [], []
            print("(new conversation)")
            continue
        cmd, _, rest = line.partition(" ")
        if cmd in ("/image", "/video"):
            path = os.path.expanduser(rest.strip())
            if not os.path.isfile(path):
                print(f"{path or '(no path)'}: no such file; usage: {cmd} PATH")
                continue
            (images if cmd == "/image" else videos).append(path)
            print(f"({cmd[1:]} attached to the next question: {path})")
            continue
        if line.startswith("/"):
            print(f"unknown command {cmd}; commands: /image PATH, /video PATH, /reset, /quit")
            continue
        sys.stdout.write("model> ")
        try:
            session.ask(line, images=images, videos=videos, on_text=_echo)
        except VlmtuneError as e:  # a bad image: say so and keep the conversation going
            print(f"error: {e}")
        print()
        images, videos = [], []


def run_eval(args) -> int:
    cfg = DataConfig(
        dataset=args.dataset,
        dataset_dir=args.dataset_dir,
        max_samples=args.max_samples,
        shuffle=False,
        on_bad_sample=args.on_bad_sample,
    )
    samples, _, skipped = load_samples(cfg)
    if skipped.total:
        print(skipped.table(), file=sys.stderr)
    if not samples:
        raise DataError(f"{args.dataset}: no usable samples ({skipped.total} skipped)")
    model, processor = _load(args)
    report = evaluate(
        model,
        processor,
        samples,
        dataset_dir=args.dataset_dir,
        generate=args.generate,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        metrics=args.metrics,
        progress=True,
        on_bad_sample=args.on_bad_sample,
    )
    if report.get("skipped"):
        print(
            f"{len(report['skipped'])} sample(s) skipped at encoding, e.g. {report['skipped'][0]}",
            file=sys.stderr,
        )
    report = {"model": args.model, "dataset": args.dataset, "skipped_at_load": skipped.as_dict(), **report}
    print(
        f"samples {report['n']}  tokens {report['tokens']}  loss {report['loss']:.4f}  ppl {report['ppl']:.3f}"
    )
    if args.generate:
        print("  ".join(f"{METRICS[m][1]} {report[METRICS[m][1]]:.4f}" for m in args.metrics))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"report written to {args.json}")
    return 0
