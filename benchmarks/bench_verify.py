"""Peak memory of `vlmtune verify` against the size of one model: it holds one model at a time.

    python benchmarks/bench_verify.py [--dtype bf16|fp32] [--tokens 8] [--threads 2]
    python benchmarks/bench_verify.py --smoke          # tiny model, seconds

The checkpoint is random, with Qwen3-VL-8B's widths (hidden 4096, MLP 12288, 32 heads / 8 KV heads of 128,
vocabulary 151936, vision 1152 wide / MLP 4304 / 16 heads) but 2 decoder layers and 2 vision blocks:
1.79 B parameters, most of them in the two vocabulary matrices. Each measurement is a fresh process:
Python with torch + transformers + vlmtune imported; vlmtune's model loaded; transformers' model loaded;
the whole `vlmtune verify` command on the synthetic inputs (round trip included). Reported: the peak of
anonymous RSS (sampled every 10 ms; memory the process cannot give back) and the peak total RSS (VmHWM; it
also counts checkpoint pages mapped by safetensors, which the kernel can reclaim). Holding both models at
once would need at least the imports plus twice the parameter bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading

import torch

# Qwen3-VL-8B widths, 2 decoder layers, 2 vision blocks (arguments of vlmtune.testing.tiny_config_dict).
MID_SIZE = dict(
    text_hidden=4096,
    text_layers=2,
    heads=32,
    kv_heads=8,
    head_dim=128,
    mrope_section=(24, 20, 20),
    vision_hidden=1152,
    vision_depth=2,
    vision_heads=16,
    deepstack=(0, 1),
    num_position_embeddings=2304,
)
INTERMEDIATE = {"text": 12288, "vision": 4304}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_checkpoint(path: str, smoke: bool, dtype: str) -> int:
    """Random checkpoint with the real tokenizer; returns its parameter bytes."""
    from transformers import AutoModelForImageTextToText

    from vlmtune.testing import hf_config, make_tiny_checkpoint, tiny_config_dict, write_assets

    if smoke:
        model = make_tiny_checkpoint(path, seed=0)
    else:
        cfg = tiny_config_dict(**MID_SIZE)
        cfg["text_config"]["intermediate_size"] = INTERMEDIATE["text"]
        cfg["vision_config"]["intermediate_size"] = INTERMEDIATE["vision"]
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(hf_config(cfg), dtype=DTYPES[dtype])
        model.save_pretrained(path)
        write_assets(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _status_bytes(field: str) -> int:
    """A `/proc/self/status` memory field (kB there) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class AnonPeak:
    """Peak anonymous RSS (RssAnon), sampled every 10 ms on a thread: the memory the process cannot give
    back. Total RSS also counts the checkpoint pages that safetensors maps (page cache, reclaimable)."""

    def __enter__(self):
        self.peak, self.done = _status_bytes("RssAnon"), threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, _status_bytes("RssAnon"))

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, _status_bytes("RssAnon"))


def child(mode: str, ckpt: str, dtype: str, tokens: int) -> dict:
    """One measurement in a fresh process: peak anonymous and total RSS (VmHWM), and for `verify` its exit
    code. `make` writes the checkpoint and returns its parameter bytes instead."""
    import transformers  # noqa: F401  every mode pays for the same imports

    from vlmtune import load_pretrained
    from vlmtune.cli import main

    if mode in ("make", "make_smoke"):
        return {"param_bytes": make_checkpoint(ckpt, mode == "make_smoke", dtype)}
    result: dict = {}
    with AnonPeak() as anon:
        if mode == "vlmtune_model":
            load_pretrained(ckpt, dtype=DTYPES[dtype])
        elif mode == "transformers_model":
            from transformers import AutoModelForImageTextToText

            AutoModelForImageTextToText.from_pretrained(
                ckpt, dtype=DTYPES[dtype], attn_implementation="eager"
            )
        elif mode == "verify":
            result["exit_code"] = main(["verify", "--model", ckpt, "--dtype", dtype, "--tokens", str(tokens)])
    result.update(peak_anon=anon.peak, peak_total=_status_bytes("VmHWM"))
    return result


def measure(mode: str, ckpt: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        ckpt,
        "--dtype",
        args.dtype,
        "--tokens",
        str(args.tokens),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    result["printed"] = lines[-2] if len(lines) > 1 else ""
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model (fp32): checks the benchmark runs")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="checkpoint and verify dtype (bf16)")
    p.add_argument("--tokens", type=int, default=8, help="greedy tokens per input (8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("MODE", "CKPT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.dtype, args.tokens = "fp32", 2
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(child(*args.child, args.dtype, args.tokens)))
        return
    with tempfile.TemporaryDirectory() as ckpt:
        param_bytes = measure("make_smoke" if args.smoke else "make", ckpt, args)["param_bytes"]
        rows = {
            m: measure(m, ckpt, args) for m in ("imports", "vlmtune_model", "transformers_model", "verify")
        }
    print_table(rows, param_bytes, args)
    if rows["verify"]["exit_code"] != 0:
        sys.exit(1)


def print_table(rows: dict, param_bytes: int, args) -> None:
    gb = 1e9
    name = "tiny model" if args.smoke else "Qwen3-VL-8B widths, 2 decoder layers, 2 vision blocks"
    print(
        f"{name}: one model = {param_bytes / gb:.2f} GB of parameters ({args.dtype}), CPU, {args.threads} threads"
    )
    print(f"{'process':34}{'peak anon RSS':>14}{'- imports':>11}{'/ one model':>12}{'peak total RSS':>16}")
    labels = {
        "imports": "imports only",
        "vlmtune_model": "vlmtune model loaded",
        "transformers_model": "transformers model loaded",
        "verify": "vlmtune verify (whole command)",
    }
    base = rows["imports"]["peak_anon"]
    for mode, label in labels.items():
        anon, total = rows[mode]["peak_anon"], rows[mode]["peak_total"]
        print(
            f"{label:34}{anon / gb:>12.2f}GB{(anon - base) / gb:>9.2f}GB{(anon - base) / param_bytes:>12.2f}"
            f"{total / gb:>14.2f}GB"
        )
    both = base + 2 * param_bytes
    print(
        f"{'both models at once (lower bound)':34}{both / gb:>12.2f}GB{2 * param_bytes / gb:>9.2f}GB{2.0:>12.2f}"
    )
    print(f"verify exit code {rows['verify']['exit_code']}: {rows['verify']['printed']}")


if __name__ == "__main__":
    main()
