"""`vlmtune convert` (Hugging Face <-> native checkpoints) and `vlmtune export` (training checkpoint -> HF)."""

from __future__ import annotations

import argparse

from vlmtune.options import cli_number

from .convert import hf_to_native, native_to_hf
from .export import export_checkpoint


def register(subparsers) -> None:
    _register_convert(subparsers)
    p = subparsers.add_parser(
        "export",
        help="write a training checkpoint in Hugging Face format",
        description="Load a training checkpoint (a step directory, or a run directory: its latest) and write "
        "HF safetensors + config + tokenizer files to --out, one tensor at a time.",
    )
    p.add_argument("checkpoint", help="checkpoint step directory, or a run's output_dir (uses its latest)")
    p.add_argument("--out", required=True, help="output directory for the Hugging Face checkpoint")
    p.set_defaults(func=run_export)


def _register_convert(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert checkpoints between Hugging Face and native (DCP) format",
        description=(
            "Convert checkpoints. Native checkpoints have no parallel layout baked in: one converted checkpoint "
            "resumes under any parallel: layout (FSDP, TP, PP, EP), so MindSpeed-MM's llm_pp_layers / "
            "vit_pp_layers / tp_size / ep_size conversion flags have no counterpart here; set them in the "
            "training config's parallel: section instead."
        ),
    )
    sub = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    h2n = sub.add_parser(
        "hf-to-native",
        help="HF safetensors directory -> native checkpoint (OUT/checkpoints/step_00000000 + latest)",
        description="Stream an HF checkpoint into a native DCP checkpoint; resume it with "
        "checkpoint.load=OUT checkpoint.no_load_optim=true checkpoint.no_load_rng=true.",
    )
    h2n.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face Qwen3-VL checkpoint directory")
    h2n.add_argument("--out", required=True, metavar="CKPT", help="output run directory")
    h2n.set_defaults(func=run_hf_to_native)
    n2h = sub.add_parser(
        "native-to-hf",
        help="native checkpoint -> HF safetensors directory that transformers loads",
        description="Stream a native checkpoint (a step directory, or a run / checkpoints directory with a "
        "'latest' pointer) into Hugging Face format, one tensor at a time.",
    )
    n2h.add_argument(
        "checkpoint", metavar="CKPT", help="step directory, or run directory with checkpoints/latest"
    )
    n2h.add_argument("--out", required=True, metavar="DIR", help="output Hugging Face directory")
    n2h.add_argument(
        "--max-shard-gb",
        type=cli_number(float, above=0),
        default=5.0,
        help="largest safetensors shard in GiB (default 5)",
    )
    n2h.set_defaults(func=run_native_to_hf)


def run_hf_to_native(args: argparse.Namespace) -> int:
    out = hf_to_native(args.hf, args.out)
    print(f"wrote native checkpoint {out}")
    return 0


def run_native_to_hf(args: argparse.Namespace) -> int:
    out = native_to_hf(args.checkpoint, args.out, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote Hugging Face checkpoint {out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote Hugging Face checkpoint to {out}")
    return 0
