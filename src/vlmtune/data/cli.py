"""`vlmtune data convert-llava` and `vlmtune data inspect`."""

from __future__ import annotations

import json
import logging

import numpy as np
from tqdm.auto import tqdm

from vlmtune.options import cli_number

from .config import DataConfig
from .convert import convert_llava
from .loader import first_fit_decreasing
from .processor import build_processor
from .report import BadSample, handle_bad
from .samples import load_samples

POSITIVE = cli_number(int, low=1)


def register(subparsers) -> None:
    data = subparsers.add_parser(
        "data", help="prepare and inspect datasets", description="Prepare and inspect datasets."
    )
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 0)[1])

    conv = sub.add_parser(
        "convert-llava",
        help="convert LLaVA-Instruct conversations to the messages format",
        description="Convert LLaVA-Instruct-150K style conversations ({id, image, conversations: [{from, value}]}) "
        "to the messages format ({messages: [{role, content}], images: [...]}): JSON / JSONL with image paths, or "
        "one self-contained .parquet file with the images embedded. Samples whose image is missing are skipped "
        "and counted; an unknown role stops with the sample id.",
    )
    conv.add_argument("--input", required=True, help="LLaVA JSON list or JSONL file")
    conv.add_argument("--image-dir", required=True, help="directory the 'image' fields are relative to")
    conv.add_argument(
        "--output", required=True, help="output file: .json list, .jsonl, or .parquet (images embedded)"
    )
    conv.add_argument(
        "--dataset-dir",
        default=None,
        help="directory the written image paths are relative to; set data.dataset_dir to it (default: the "
        "output's folder when the images are inside it, else --image-dir)",
    )
    conv.set_defaults(func=run_convert)

    ins = sub.add_parser(
        "inspect",
        help="count samples, skipped samples, token lengths and packing for a dataset",
        description="Read datasets as training would and report samples, skipped samples by reason, percentiles "
        "of text and visual tokens, and packing fill / steps per epoch for a micro-batch token budget.",
    )
    ins.add_argument(
        "--dataset",
        required=True,
        help="comma-separated .json / .jsonl / .parquet files, globs, directories of Parquet shards or "
        "datasets.save_to_disk directories",
    )
    ins.add_argument("--dataset-dir", default=".", help="base directory of relative media paths")
    ins.add_argument(
        "--model", required=True, help="checkpoint directory (tokenizer, chat template, preprocessor configs)"
    )
    ins.add_argument(
        "--max-tokens", type=POSITIVE, default=8192, help="micro-batch token budget (default 8192)"
    )
    ins.add_argument(
        "--cutoff-len", type=POSITIVE, default=8192, help="per-sample token limit (default 8192)"
    )
    ins.add_argument(
        "--max-samples", type=POSITIVE, default=None, help="read at most this many samples per dataset"
    )
    ins.add_argument("--json", action="store_true", help="print the report as JSON")
    ins.add_argument("--plot", default=None, metavar="OUT.png", help="save a histogram of sample lengths")
    ins.set_defaults(func=run_inspect)


def run_convert(args) -> int:
    s = convert_llava(args.input, args.image_dir, args.output, args.dataset_dir)
    print(
        f"read {s['input']} samples; wrote {s['written']} ({s['with_images']} with images, {s['text_only']} text-only) "
        f"to {s['output']}; skipped {s['skipped_missing_image']} with a missing image"
    )
    if s["dataset_dir"] is None:
        print(f"images are embedded in {s['output']}: it needs no data.dataset_dir")
        return 0
    print(f"image paths are relative to {s['dataset_dir']}: set data.dataset_dir: {s['dataset_dir']}")
    if s["outside_dataset_dir"]:
        print(
            f"warning: {s['outside_dataset_dir']} image path(s) lead outside {s['dataset_dir']}; training refuses "
            "them unless data.restrict_media_to_dataset_dir: false (or pass a --dataset-dir that holds the images)"
        )
    return 0


def _percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {f"p{q}": int(np.percentile(a, q)) for q in (0, 50, 90, 99, 100)} | {"mean": float(a.mean())}


def inspect_dataset(cfg, processor, max_tokens: int) -> tuple[dict, list[int]]:
    """Report dict and per-sample lengths for `vlmtune data inspect`."""
    train, val, report = load_samples(cfg)
    samples = train + val
    lengths, text, visual = [], [], []
    for s in tqdm(samples, desc="measuring", disable=len(samples) < 500):
        try:
            total, vis = processor.measure(s, cfg.dataset_dir)
            if total > max_tokens:
                raise BadSample(
                    "over_long", f"{total} tokens > max_tokens {max_tokens}", s["_file"], s["_where"]
                )
        except BadSample as e:
            handle_bad(e, "skip", report)
            continue
        lengths.append(total)
        text.append(total - vis)
        visual.append(vis)
    bins = first_fit_decreasing(list(range(len(lengths))), lengths, max_tokens) if lengths else []
    result = {
        "samples": len(lengths),
        "skipped": report.as_dict(),
        "text_tokens": _percentiles(text),
        "visual_tokens": _percentiles(visual),
        "total_tokens": _percentiles(lengths),
        "max_tokens": max_tokens,
        "steps_per_epoch_per_rank_1": len(bins),
        "packing_fill": (sum(lengths) / (len(bins) * max_tokens)) if bins else 0.0,
    }
    return result, lengths


def run_inspect(args) -> int:
    data_log = logging.getLogger("vlmtune.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)  # the report lists skips by reason
    try:
        return _inspect(args)
    finally:
        data_log.setLevel(level)


def _inspect(args) -> int:
    cfg = DataConfig(
        dataset=args.dataset,
        dataset_dir=args.dataset_dir,
        max_samples=args.max_samples,
        cutoff_len=args.cutoff_len,
        shuffle=False,
    )
    processor = build_processor(args.model, cfg)
    result, lengths = inspect_dataset(cfg, processor, args.max_tokens)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"samples: {result['samples']}   skipped: {result['skipped']['total']}")
        for reason, n in result["skipped"]["by_reason"].items():
            print(f"  skipped {reason:<28}{n:>8}   e.g. {result['skipped']['first_example'][reason]}")
        print(f"{'tokens':<10}{'p0':>8}{'p50':>8}{'p90':>8}{'p99':>8}{'p100':>8}{'mean':>10}")
        for name in ("text", "visual", "total"):
            p = result[f"{name}_tokens"]
            if p:
                print(
                    f"{name:<10}"
                    + "".join(f"{p[k]:>8}" for k in ("p0", "p50", "p90", "p99", "p100"))
                    + f"{p['mean']:>10.1f}"
                )
        print(
            f"packing into {args.max_tokens}-token micro-batches: {result['steps_per_epoch_per_rank_1']} per epoch "
            f"(one rank; divide by the data-parallel size), fill {100 * result['packing_fill']:.1f}%"
        )
    if args.plot:
        import matplotlib  # heavy, optional: only for --plot

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(lengths, bins=50)
        ax.set_xlabel("tokens per sample")
        ax.set_ylabel("samples")
        ax.set_title(f"{result['samples']} samples, max_tokens {args.max_tokens}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    return 0
