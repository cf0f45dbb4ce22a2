"""Everything that needs a GPU, in one command on one H100/H200 (about 6 of at most 8 minutes): writes
OUT/gpu_report.json and OUT/gpu_report.md (the tables docs/performance.md takes).

On the GPU machine (no network; Python 3.12, torch 2.11, transformers 5.17, pytest preinstalled), from the
repository root, with .whl/ filled beforehand by `bash benchmarks/fetch_wheels.sh` where PyPI is reachable:

    pip install --no-index --no-deps --target .whl/site .whl/*.whl
    PYTHONPATH=src:.whl/site python benchmarks/gpu.py [--out gpu_out] [--only varlen,syncs] [--steps 3]

On a CPU, `python benchmarks/gpu.py --dry-run` runs every section at toy sizes (gloo, SDPA with masks, no
sync counting): it checks that the script runs from the source tree, and measures nothing.

Sections:
- pytest: `pytest -m gpu` (collection only in a dry run);
- varlen: FlashAttention varlen forward + backward, 16k tokens in 8 packed samples (32/8 heads x 128,
  causal) and the vision shape (16 heads x 72, non-causal), against per-sample fp32 SDPA;
- grouped_gemm: E=128, H=2048, I=768, top-8, 16k tokens, 20 experts empty, against the per-expert loop;
- syncs: host syncs in one forward + backward of a decoder layer (8B), a MoE layer (30B-A3B) and a vision
  block, counted with `torch.cuda.set_sync_debug_mode`;
- nccl_steps: three train steps through the real process group (NCCL) and FSDP2 on a tiny model;
- throughput: 8B widths (4 decoder layers, full vision tower) and 30B-A3B widths (4 decoder layers), random
  init, bf16 compute, full activation checkpointing, 16k-token packed micro-batches of images and text:
  vlmtune vs transformers (sdpa, padded batches of the same samples, its own MoE), side by side;
- context_parallel: `bench_cp.py` at 64k tokens, per-rank activation memory and CUDA peak at cp = 1, 2, 4
  (as many as there are GPUs: NCCL takes one per rank);
- lora: `bench_lora.py --gpu`, full fine-tuning / LoRA / QLoRA at Qwen3-VL-8B widths (2 decoder layers, bf16):
  CUDA peak, state bytes, step time and the first losses side by side, with what `vlmtune plan` predicts
  for each run (state bytes, and the peak to hold against `max_memory_allocated`).
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The source tree and the wheels installed next to it (`--target .whl/site`): nothing needs to be installed.
IMPORT_PATHS = [
    HERE,
    os.path.join(ROOT, "src"),
    os.path.join(ROOT, "tests"),
    os.path.join(ROOT, ".whl", "site"),
]
IMPORT_PATHS = [p for p in IMPORT_PATHS if os.path.isdir(p)]
sys.path[:0] = IMPORT_PATHS

import gpu_checks as checks  # noqa: E402
import torch  # noqa: E402
from gpu_throughput import run_transformers, run_vlmtune  # noqa: E402

SECTIONS = (
    "pytest",
    "varlen",
    "grouped_gemm",
    "syncs",
    "nccl_steps",
    "throughput",
    "context_parallel",
    "lora",
)


# -- sections ----------------------------------------------------------------------------------------------
def section_pytest(ctx) -> dict:
    """`pytest -m gpu` in a subprocess with this script's import path; its summary line and counts."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*IMPORT_PATHS, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, *(["-S"] if sys.flags.no_site else []), "-m", "pytest", "-m", "gpu", "-q"]
    cmd += ["-p", "no:cacheprovider", *(["--collect-only"] if ctx["dry"] else []), "tests"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {"status": "ok" if res.returncode == 0 else "failed", "returncode": res.returncode,
            "summary": lines[-1] if lines else res.stderr[-500:], "failures": failures[:20],
            "error": "" if res.returncode == 0 else res.stdout[-3000:] + res.stderr[-1000:]}  # fmt: skip


def section_varlen(ctx) -> dict:
    if ctx["dry"]:
        dec = dict(tokens=256, samples=8, hq=4, hkv=2, head_dim=16, causal=True)
        vis = dict(tokens=256, samples=4, hq=2, hkv=2, head_dim=16, causal=False)
    else:
        dec = dict(tokens=16384, samples=8, hq=32, hkv=8, head_dim=128, causal=True)
        vis = dict(tokens=16384, samples=16, hq=16, hkv=16, head_dim=72, causal=False)
    return {
        "decoder": checks.varlen_check(ctx["device"], **dec),
        "vision": checks.varlen_check(ctx["device"], **vis),
    }


def section_grouped_gemm(ctx) -> dict:
    if ctx["dry"]:
        return checks.grouped_gemm_check(ctx["device"], tokens=128, experts=8, hidden=64, inter=32, top_k=2,
                                         empty=2, repeats=1)  # fmt: skip
    return checks.grouped_gemm_check(ctx["device"], tokens=16384, experts=128, hidden=2048, inter=768,
                                     top_k=8, empty=20)  # fmt: skip


def section_syncs(ctx) -> dict:
    if ctx["dry"]:
        return checks.layer_sync_counts(ctx["device"], dense="toy", moe="toy-moe", tokens=64, samples=3,
                                        images=2, side=4)  # fmt: skip
    return checks.layer_sync_counts(ctx["device"], dense="8b", moe="30b-a3b", tokens=16384, samples=8,
                                    images=16, side=32)  # fmt: skip


def section_nccl_steps(ctx) -> dict:
    """Three optimizer steps of the trainer's data-parallel strategy on a tiny checkpoint, through the
    process group `init_distributed` made (NCCL on CUDA) and FSDP2, bf16 on CUDA."""
    import torch.distributed as dist

    from vlmtune.testing import make_tiny_checkpoint
    from vlmtune.train.build import build_sharded_model
    from vlmtune.train.config import TrainConfig
    from vlmtune.train.optim import build_optimizer
    from vlmtune.train.step import DataParallelStep, TrainModule, finish_step

    from model_inputs import as_packed_batch, build_sample, packed_row

    info, cuda = ctx["info"], ctx["device"].type == "cuda"
    with tempfile.TemporaryDirectory() as ckpt:
        make_tiny_checkpoint(ckpt, seed=0, assets=False)
        root, model = build_sharded_model(
            ckpt, lambda m: TrainModule(m), info, mixed_precision="bf16" if cuda else "fp32",
            activation_checkpointing="full",
        )  # fmt: skip
    cfg = TrainConfig()
    cfg.optim.lr = 1e-3
    optimizer = build_optimizer(model, cfg)
    strategy = DataParallelStep(root, info.device, info.dp_size, info.dp_group)
    samples = [
        build_sample([6, ("image", 4, 4), 9], 1),
        build_sample([13], 2),
        build_sample([5, ("video", 2, 4, 4)], 3),
    ]
    micro = [as_packed_batch(packed_row(samples[:2])), as_packed_batch(packed_row(samples[2:]))]
    losses, norms = [], []
    for step in range(3):
        loss, tokens, labels = strategy.forward_backward(micro)
        r = finish_step(optimizer, micro, loss, tokens, labels, 1.0, "stop", step)
        losses.append(r.loss)
        norms.append(r.grad_norm)
    return {"backend": str(dist.get_backend()), "losses": losses, "grad_norms": norms}


def section_throughput(ctx) -> dict:
    """Each (model, implementation) on its own, memory freed in between; failures are recorded."""
    out = {}
    kinds = ("toy", "toy-moe") if ctx["dry"] else ("8b", "30b-a3b")
    for kind in kinds:
        out[kind] = {}
        for name, fn in (("vlmtune", run_vlmtune), ("transformers", run_transformers)):
            try:
                out[kind][name] = fn(kind, ctx)
            except Exception as e:  # an OOM on one side must not lose the other
                out[kind][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            gc.collect()
            if ctx["device"].type == "cuda":
                torch.cuda.empty_cache()
    return out


def section_context_parallel(ctx) -> dict:
    """`bench_cp.py` at 64k tokens: per-rank activation memory at each cp size of 1, 2, 4 that the visible
    GPUs allow (one GPU per rank; the others are listed as skipped). Dry run: its smoke sizes on gloo."""
    import bench_cp

    return bench_cp.gpu_section(ctx["dry"])


def section_lora(ctx) -> dict:
    """`bench_lora.py --gpu`: full / LoRA / QLoRA peak memory and step time (dry run: its smoke sizes)."""
    import bench_lora

    return bench_lora.gpu_section(ctx["dry"])


# -- report ------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    import transformers

    import vlmtune

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        commit = ""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": sys.version.split()[0], "vlmtune": os.path.dirname(vlmtune.__file__),
        "commit": commit.strip() or None,
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_out", help="directory for gpu_report.json and gpu_report.md")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per throughput run")
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the script only")
    ap.add_argument(
        "--smoke", action="store_true", help="the same as --dry-run (every benchmark has --smoke)"
    )
    a = ap.parse_args()
    a.dry_run = a.dry_run or a.smoke
    only = [s for s in a.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    cuda = torch.cuda.is_available() and not a.dry_run
    if not cuda and not a.dry_run:
        ap.error("no CUDA device visible; run with --dry-run to check the script on a CPU")
    from gpu_report import write_report

    from vlmtune.parallel.mesh import close_distributed, init_distributed

    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    report = {"dry_run": a.dry_run, "environment": environment(device), "sections": {}}
    ctx = {"device": device, "dry": a.dry_run, "steps": 1 if a.dry_run else a.steps}
    start = time.perf_counter()
    ctx["info"] = init_distributed("cuda" if cuda else "cpu")
    try:
        for name in SECTIONS:
            if name in only:
                report["sections"][name] = run_section(name, ctx)
    finally:
        close_distributed()
    report["seconds"] = round(time.perf_counter() - start, 1)
    md = write_report(report, a.out)
    print(md)
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


def run_section(name: str, ctx) -> dict:
    t = time.perf_counter()
    print(f"[gpu.py] {name} ...", flush=True)
    try:
        result = {"status": "ok", **globals()[f"section_{name}"](ctx)}
    except Exception:
        result = {"status": "failed", "error": traceback.format_exc()[-2000:]}
    result["seconds"] = round(time.perf_counter() - t, 1)
    print(f"[gpu.py] {name}: {result['status']} in {result['seconds']} s", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
