"""`vlmtune verify`."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from vlmtune.data import DataConfig, load_samples
from vlmtune.errors import VlmtuneError

from .verify import VerifyOptions, verify

DESCRIPTION = """\
Prove that a checkpoint computes in vlmtune what it computes in transformers (the reference, loaded with
eager attention), then check the export round trip.

Inputs: the samples of --data (each alone, plus the first three as a left-padded batch and as a packed row),
or built-in synthetic ones (text, one image, two images, a video, image + video, a padded batch, a packed
row; the images and the clip are drawn on the fly). Per input kind it prints the max-abs and mean-abs
difference of the logits, the loss difference and how many of --tokens greedy tokens agree, PASS or FAIL:
  fp32: logits max-abs <= 1e-4;  bf16: max-abs <= 16 bf16 ulps at the largest |logit| and mean-abs <=
  2**-5 * mean|logit|;  both: loss within twice the max-abs bound, greedy tokens equal (or differing only
  at a near tie). Then: HF -> vlmtune -> HF must give bitwise-identical tensors.

Memory: ONE model is loaded at a time. vlmtune runs every input and writes its logits to the work
directory, is freed, and only then transformers is loaded and compared input by input, so the peak is one
model plus the activations of one input. The work directory needs the logits of every input (tokens x
vocabulary x 4 bytes each) and, for the round trip, one more copy of the checkpoint; a training checkpoint
is first exported there (streamed, tensor by tensor) for transformers to read.

Parallel layouts: under torchrun, --parallel.tp / --parallel.ep (their product = the number of processes)
first run every input in that layout; rank 0 then compares them with one process (gloo on the CPU):
  torchrun --nproc_per_node 2 -m vlmtune.cli verify --model DIR --parallel.tp=2

Exit code: 0 every check passed, 1 a check failed, 2 bad input. The last line printed is a one-line summary."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify",
        help="prove a checkpoint computes what transformers computes (logits, loss, greedy tokens, round trip)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="Hugging Face checkpoint directory, or a training checkpoint / run directory from `vlmtune train`",
    )
    p.add_argument(
        "--processor", metavar="DIR", help="tokenizer + preprocessor directory (default: the model's)"
    )
    p.add_argument(
        "--data", metavar="FILE", help="comma-separated JSON / JSONL datasets (default: synthetic inputs)"
    )
    p.add_argument(
        "--dataset-dir", default=".", metavar="DIR", help="base directory of relative media paths (.)"
    )
    p.add_argument(
        "--max-samples", type=int, default=4, metavar="N", help="first N samples of each dataset (4)"
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available, else cpu"
    )
    p.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype of both models (fp32)"
    )
    p.add_argument(
        "--tokens", type=int, default=8, metavar="N", help="greedy tokens compared per input (8; 0 = none)"
    )
    p.add_argument("--json", metavar="OUT", help="write the full report here")
    p.add_argument(
        "--work-dir", metavar="DIR", help="keep logits and exports here (default: a removed temp dir)"
    )
    p.add_argument("--no-round-trip", action="store_true", help="skip the HF -> vlmtune -> HF check")
    p.add_argument(
        "--parallel.tp", dest="tp", type=int, default=1, metavar="N", help="tensor parallel size (1)"
    )
    p.add_argument(
        "--parallel.ep", dest="ep", type=int, default=1, metavar="N", help="expert parallel size (1)"
    )
    p.set_defaults(func=run_verify)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _load_samples(args) -> list[dict] | None:
    if not args.data:
        return None
    cfg = DataConfig(
        dataset=args.data,
        dataset_dir=args.dataset_dir,
        max_samples=args.max_samples,
        shuffle=False,
        on_bad_sample="error",
    )
    return load_samples(cfg)[0]


def run_verify(args) -> int:
    if args.tokens < 0 or args.max_samples < 1 or args.tp < 1 or args.ep < 1:
        return _fail("--tokens must be >= 0; --max-samples, --parallel.tp and --parallel.ep >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is visible; use --device cpu")
    try:
        opts = VerifyOptions(
            model=args.model,
            processor=args.processor,
            samples=_load_samples(args),
            dataset_dir=args.dataset_dir,
            device=device,
            dtype=args.dtype,
            tokens=args.tokens,
            tp=args.tp,
            ep=args.ep,
            round_trip=not args.no_round_trip,
            work_dir=args.work_dir,
            progress=True,
        )
        rep = verify(opts)
    except (OSError, ValueError, VlmtuneError) as e:
        return _fail(str(e))
    if rep is None:  # not rank 0: rank 0 reports
        return 0
    print_report(rep)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2)
        print(f"report written to {args.json}")
    print(f"verify {rep['summary']}", flush=True)
    return 0 if rep["passed"] else 1


def _greedy(row: dict) -> str:
    g = row.get("greedy")
    if g is None:
        return "-"
    return f"{g['agree']}/{g['steps']}" + ("*" if g["ties"] else "")


def print_report(rep: dict) -> None:
    print(f"model {rep['model']}  reference {rep['reference']}  {rep['dtype']} on {rep['device']}")
    print(f"tolerance: {rep['tolerance']}")
    width = max([len(c["kind"]) for c in rep["checks"]] + [10])
    for group in dict.fromkeys(c["check"] for c in rep["checks"]):
        print(f"\n{group}")
        print(
            f"  {'input':<{width}}  {'max-abs':>9}  {'mean-abs':>9}  {'loss diff':>9}  {'greedy':>7}  result"
        )
        for c in (c for c in rep["checks"] if c["check"] == group):
            if "max_abs" not in c:
                print(f"  {c['kind']:<{width}}  FAIL  {c['failures'][0]}")
                continue
            result = "PASS" if c["passed"] else "FAIL  " + "; ".join(c["failures"])
            print(
                f"  {c['kind']:<{width}}  {c['max_abs']:>9.2e}  {c['mean_abs']:>9.2e}  {c['loss_diff']:>9.2e}  "
                f"{_greedy(c):>7}  {result}"
            )
    if any(c.get("greedy", {}).get("ties") for c in rep["checks"]):
        print("  * greedy tokens differ only at a near tie of the reference's top logits")
    rt = rep["round_trip"]
    if rt is not None:
        size = f"{rt['tensors']} tensors, {rt['bytes'] / 2**20:.1f} MiB"
        verdict = "bitwise identical  PASS" if rt["passed"] else "FAIL: " + "; ".join(rt["mismatches"][:5])
        print(f"\nexport round trip (HF -> vlmtune -> HF, {size}): {verdict}")
        for note in rt["notes"]:
            print(f"  note: {note}")
