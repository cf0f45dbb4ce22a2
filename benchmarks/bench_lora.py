"""Full fine-tuning vs LoRA vs QLoRA through the real trainer, on the same model and data: peak memory, the
memory the training state holds (weights, gradients, optimizer state), step time, and QLoRA's numerics.

    python benchmarks/bench_lora.py [--steps 4] [--threads 2]     # CPU, a mid-size model (fp32 compute)
    python benchmarks/bench_lora.py --smoke                       # tiny model, seconds (CI)
    python benchmarks/bench_lora.py --gpu [--layers 2]            # CUDA, Qwen3-VL-8B widths, bf16

Each mode trains in a fresh process (`vlmtune.train.trainer.Trainer`, one rank), so its peak is its own:
on CUDA `torch.cuda.max_memory_allocated`, on the CPU the peak anonymous RSS minus the process's RSS
before the trainer started. "state" counts the storages of the parameters (NF4 weights: their inner
tensors), gradients (none between steps) and AdamW state, at the end of the run. Step time: the median over steps after the
first. QLoRA numerics: the relative error of the NF4 weights against the weights they quantize, and the
loss of the first step against LoRA's (same initial adapters, so the loss gap is the quantization error).
`gpu_peak_memory()` is what a GPU script calls for the 8B-width numbers. Each mode also reports what `vlmtune
plan` predicts for the same run ("plan GiB": on CUDA the number to hold against `max_memory_allocated`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading

import torch

MODES = {
    "full": {},
    "lora": {"rank": 16, "alpha": 32},
    "qlora": {"rank": 16, "alpha": 32, "base_quant": "nf4"},
}
CPU_SIZE = dict(text_hidden=512, text_layers=4, heads=8, kv_heads=4, head_dim=64, mrope_section=(8, 12, 12),
                vision_hidden=128, vision_depth=2, vision_heads=4, deepstack=(0,), tie_word_embeddings=True)  # fmt: skip
SMOKE_SIZE = dict(text_hidden=64, text_layers=2, heads=2, kv_heads=1, head_dim=16, vision_hidden=32,
                  vision_depth=2, deepstack=(0,), tie_word_embeddings=True)  # fmt: skip
# Qwen3-VL-8B widths (hidden 4096, MLP 12288, 32 heads / 8 KV heads of 128; vision 1152 / 4304 / 16 heads).
GPU_SIZE = dict(text_hidden=4096, heads=32, kv_heads=8, head_dim=128, mrope_section=(24, 20, 20),
                vision_hidden=1152, vision_depth=2, vision_heads=16, deepstack=(0, 1), num_position_embeddings=2304)  # fmt: skip
GPU_INTERMEDIATE = {"text": 12288, "vision": 4304}


def make_checkpoint(path: str, size: dict, intermediate: dict | None = None) -> None:
    from transformers import AutoModelForImageTextToText

    from vlmtune.testing import hf_config, tiny_config_dict, write_assets

    cfg = tiny_config_dict(**size)
    if intermediate:
        cfg["text_config"]["intermediate_size"] = intermediate["text"]
        cfg["vision_config"]["intermediate_size"] = intermediate["vision"]
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(hf_config(cfg)).save_pretrained(path)
    write_assets(path)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


class Peak:
    """Peak anonymous RSS above the level at entry, sampled every 5 ms (CPU), or CUDA's peak allocation."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = _rss("RssAnon")
            self.done = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, _rss("RssAnon"))

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.done.set()
            self.thread.join()
        self.value = self.peak - self.base


def state_bytes(model, optimizer) -> dict:
    """Bytes of the distinct storages of the parameters, gradients and AdamW moments (the `step` scalars,
    host-side, left out), as `vlmtune plan` counts them."""
    from vlmtune.testing import storage_bytes

    state = [v for s in optimizer.state.values() for k, v in s.items() if k != "step" and torch.is_tensor(v)]
    params = storage_bytes(model.parameters())
    grads = storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
    optim = storage_bytes(state)
    return {"params": params, "grads": grads, "optimizer": optim, "total": params + grads + optim}


def nf4_error(model) -> float | None:
    """max over NF4 weights of ||dequantized - original|| / ||original|| (the originals are re-read)."""
    from vlmtune.checkpoint.hf import iter_checkpoint

    nf4 = {n: p for n, p in model.named_parameters() if type(p).__name__ == "NF4Tensor"}
    if not nf4:
        return None
    errors = []
    for hf_name, t in iter_checkpoint(model.source_dir):
        name = hf_name[len("model.") :]
        if name in nf4:
            w = t.to(nf4[name].dtype).float()
            errors.append(float((nf4[name].get_original_weight().float() - w).norm() / w.norm()))
    return max(errors)


def config(mode: str, work: str, steps: int, device: str) -> dict:
    return {
        "output_dir": os.path.join(work, mode),
        "model": {"init_from_hf": os.path.join(work, "base")},
        "data": {"dataset": "train.json", "dataset_dir": os.path.join(work, "data"), "num_workers": 0,
                 "image_min_pixels": 4096, "image_max_pixels": 9216, "cache_dir": os.path.join(work, "cache")},
        "train": {"train_iters": steps, "micro_batch_tokens": 512, "seed": 0, "device": device,
                  "mixed_precision": "bf16" if device == "cuda" else "fp32"},
        "optim": {"lr": 1e-4, "schedule": "constant"},
        "checkpoint": {"save_interval": 0, "save_hf": False, "no_save_optim": True},
        "logging": {"tensorboard": False, "progress_bar": False},
        "lora": {**MODES[mode], **({"vision_projector": True} if MODES[mode] else {})},
    }  # fmt: skip


def child(mode: str, work: str, steps: int, device: str) -> dict:
    from vlmtune.models.qwen3_vl import load_config
    from vlmtune.parallel.mesh import close_distributed, init_distributed
    from vlmtune.train.config import from_dict
    from vlmtune.train.metrics import read_metrics
    from vlmtune.train.trainer import Trainer

    cfg = from_dict(config(mode, work, steps, device))
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    args = load_config(cfg.model.init_from_hf)
    info = init_distributed(device, cfg.parallel, args)
    try:
        with Peak(device) as peak:
            trainer = Trainer(cfg, info, args)
            trainer.run()
        result = {"peak": peak.value, "state": state_bytes(trainer.model, trainer.optimizer)}
        result["nf4_rel_error"] = nf4_error(trainer.model)
        result["trainable"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    finally:
        close_distributed()
    result["plan"] = plan_prediction(cfg, args)
    records = [r for r in read_metrics(cfg.output_dir) if "loss" in r]
    result["losses"] = [r["loss"] for r in records]
    result["step_s"] = statistics.median(r["tokens"] / r["tokens_per_s"] for r in records[1:] or records)
    return result


def plan_prediction(cfg, args) -> dict:
    """What `vlmtune plan` predicts for this run on one GPU (the length index the run wrote gives it the real
    micro-batches): parameter and optimizer bytes, and the peak without the plan's runtime reserve (the CUDA
    context and NCCL, which `max_memory_allocated` does not see)."""
    from vlmtune.parallel.layout import resolve
    from vlmtune.train.plan import GPUS, Hardware, estimate
    from vlmtune.train.plan_memory import Layout
    from vlmtune.train.plan_search import make_context

    ctx = make_context(cfg, Hardware(GPUS["h200"], 1, 1, 989.0))
    layout = Layout.from_parallel(resolve(cfg.parallel, 1, args))
    est = estimate(ctx, layout, cfg.model.activation_checkpointing, cfg.train.micro_batch_tokens)
    return {"params": est.states.params, "optimizer": est.states.optimizer, "peak": est.peak - est.reserve}


def measure(mode: str, work: str, steps: int, device: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, work, "--steps", str(steps), "--device", device]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{mode} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(work: str, size: dict, intermediate: dict | None = None, n: int = 24) -> None:
    from vlmtune.demo import make_dataset

    make_checkpoint(os.path.join(work, "base"), size, intermediate)
    make_dataset(os.path.join(work, "data"), n_train=n, n_eval=1, seed=0)


def compare(work: str, steps: int, device: str, threads: int) -> dict:
    return {mode: measure(mode, work, steps, device, threads) for mode in MODES}


def gpu_peak_memory(layers: int = 2, steps: int = 3) -> dict:
    """Peak CUDA memory, state bytes and step time of full / LoRA / QLoRA on a Qwen3-VL-8B-width model with
    `layers` decoder layers (bf16 compute, one GPU), for the GPU script."""
    with tempfile.TemporaryDirectory() as work:
        prepare(work, {**GPU_SIZE, "text_layers": layers}, GPU_INTERMEDIATE)
        return compare(work, steps, "cuda", threads=8)


def gpu_section(dry: bool) -> dict:
    """gpu.py's `lora` section: `gpu_peak_memory` on the GPU; a dry run: the smoke sizes on the CPU."""
    if not dry:
        return {"title": "Qwen3-VL-8B widths, 2 decoder layers, CUDA bf16", "modes": gpu_peak_memory()}
    with tempfile.TemporaryDirectory() as work:
        prepare(work, SMOKE_SIZE)
        return {"title": "tiny model, CPU fp32 (dry run)", "modes": compare(work, 2, "cpu", threads=1)}


def table(results: dict, title: str) -> str:
    gb = 2**30
    lines = [f"{title}", f"{'mode':<6} {'peak GiB':>9} {'plan GiB':>9} {'state GiB':>10} {'params':>8} "
             f"{'optim':>8} {'trainable':>12} {'step s':>8}  first losses"]  # fmt: skip
    for mode, r in results.items():
        s = r["state"]
        lines.append(f"{mode:<6} {r['peak'] / gb:9.3f} {r['plan']['peak'] / gb:9.3f} {s['total'] / gb:10.3f} "
                     f"{s['params'] / gb:8.3f} {s['optimizer'] / gb:8.3f} {r['trainable']:12,} "
                     f"{r['step_s']:8.3f}  {[round(x, 4) for x in r['losses'][:3]]}")  # fmt: skip
    q, lo = results["qlora"], results["lora"]
    lines.append(f"QLoRA: NF4 weights' max relative error {q['nf4_rel_error']:.4f}; first-step loss "
                 f"{q['losses'][0]:.5f} vs LoRA {lo['losses'][0]:.5f} (relative gap "
                 f"{abs(q['losses'][0] / lo['losses'][0] - 1):.2e})")  # fmt: skip
    exact = all(r["plan"][k] == r["state"][k] for r in results.values() for k in ("params", "optimizer"))
    lines.append(f"`vlmtune plan`: parameter and optimizer bytes {'equal' if exact else 'DIFFER from'} the "
                 "measured ones; 'plan GiB' is its peak without the runtime reserve (on CUDA comparable with "
                 "'peak GiB', max_memory_allocated; on the CPU 'peak' is RSS)")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 steps: checks the benchmark runs")
    p.add_argument("--gpu", action="store_true", help="CUDA, Qwen3-VL-8B widths (gpu_peak_memory)")
    p.add_argument("--layers", type=int, default=2, help="--gpu: decoder layers (2)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--child", nargs=2, metavar=("MODE", "WORK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(child(args.child[0], args.child[1], args.steps, args.device)))
        return
    if args.gpu:
        print(
            table(
                gpu_peak_memory(args.layers, args.steps),
                f"Qwen3-VL-8B widths, {args.layers} decoder layers, CUDA bf16",
            )
        )
        return
    steps = 2 if args.smoke else args.steps
    with tempfile.TemporaryDirectory() as work:
        prepare(work, SMOKE_SIZE if args.smoke else CPU_SIZE)
        results = compare(work, steps, "cpu", args.threads)
    name = (
        "tiny model"
        if args.smoke
        else "text 512 wide x 4 layers (tied 151936-token embedding), vision 128 x 2"
    )
    print(table(results, f"{name}, CPU fp32, {steps} steps, {args.threads} threads"))


if __name__ == "__main__":
    main()
