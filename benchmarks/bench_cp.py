"""Context parallelism: per-rank activation memory of one long packed row at cp = 1, 2, 4, and how evenly
the split shares the work.

    python benchmarks/bench_cp.py [--tokens 8192] [--cp 1,2,4] [--smoke]

The row: one long video (a quarter of the tokens in 8 x 8-patch frame-pairs: 97 of them at 8k tokens)
packed with image + text samples; labels on the last 16 tokens of every sample. On the CPU the length is
bounded by the SDPA path's masks (`[L, L]` per decoder layer, and the vision tower's over all of a rank's
patches, kept as float by SDPA), not by what is measured: 8k tokens need about 2 GiB per process. Each cp size runs one forward + backward of the trainer's
data-parallel step in `cp` processes (gloo on the CPU, NCCL on GPUs) and reports, per rank:

- **saved**: bytes of the tensors autograd keeps for backward (each storage once; parameters, including
  FSDP's gathered copies, left out). This is the activation memory, measured, not estimated. The CPU
  path's attention masks (`[1, 1, n, n]`: the row's and the vision tower's; FlashAttention varlen on CUDA
  builds none) are reported apart, as `masks`;
- on CUDA, **peak**: `max_memory_allocated` during the step minus what was allocated before it.

The balance table is arithmetic on the same row's split (`parallel/context_split.py`), for cp = 2, 4, 8:
the busiest rank's excess over the mean, for label tokens (lm_head work), vision patches, the model FLOPs
of a step (`train/flops.py`) at Qwen3-VL-8B widths (36 layers, the real vision tower) with Ulysses'
attention (every rank: heads/cp heads over the whole row, so `1/cp` of it), and, for comparison, the
causal attention work a rank would own if it attended with its own queries (ring attention) under a
contiguous and a zig-zag split.

`gpu.py` calls `gpu_section` (64k tokens, every cp size the visible GPUs allow).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]

SIZE = dict(text_hidden=256, text_layers=4, heads=8, kv_heads=4, head_dim=32, mrope_section=(4, 6, 6),
            vision_hidden=128, vision_depth=4, vision_heads=4, deepstack=(0, 1), num_position_embeddings=256)  # fmt: skip
SMOKE_SIZE = dict(text_hidden=64, text_layers=2, heads=4, kv_heads=2, head_dim=16, mrope_section=(2, 3, 3),
                  vision_hidden=32, vision_depth=2, vision_heads=2, deepstack=(0,), num_position_embeddings=64)  # fmt: skip
LABELS_PER_SAMPLE = 16


def long_row(tokens: int, side: int = 8, video_share: float = 0.25):
    """A PackedBatch of about `tokens` tokens: a video of `side x side`-patch frame-pairs filling
    `video_share` of it, then samples of text around one image, then text."""
    from model_inputs import as_packed_batch, build_sample, packed_row

    pair = 3 + 2 + side * side // 4  # timestamp, start / end, pads
    pairs = max(1, int(tokens * video_share) // pair)
    samples = [build_sample([32, ("video", pairs, side, side), 32], 0)]
    used, seed = samples[0]["input_ids"].shape[1], 1
    image = [200, ("image", side, side), 200]
    per_image = 400 + 2 + side * side // 4
    while tokens - used > per_image:
        samples.append(build_sample(image, seed))
        used, seed = used + samples[-1]["input_ids"].shape[1], seed + 1
    if tokens - used > LABELS_PER_SAMPLE:
        samples.append(build_sample([tokens - used], seed))
    row = packed_row(samples)
    cu = row["cu_seqlens"].tolist()
    keep = torch.zeros_like(row["labels"], dtype=torch.bool)
    for end in cu[1:]:
        keep[:, end - LABELS_PER_SAMPLE : end] = True
    row["labels"] = row["labels"].masked_fill(~keep, -100)
    return as_packed_batch(row)


def _is_param(t: torch.Tensor) -> bool:
    base = t._base if t._base is not None else t
    return base.is_leaf and base.requires_grad


def _rank_main(rank: int, cp: int, port: int, ckpt: str, tokens: int, cuda: bool, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(cp),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    from vlmtune.models.qwen3_vl import load_config
    from vlmtune.parallel.context import context_parallel
    from vlmtune.parallel.layout import ParallelConfig
    from vlmtune.parallel.mesh import close_distributed, init_distributed
    from vlmtune.train.build import build_sharded_model
    from vlmtune.train.step import DataParallelStep, TrainModule

    args = load_config(ckpt)
    info = init_distributed("cuda" if cuda else "cpu", ParallelConfig(cp=cp), args)
    context = context_parallel(info, args)
    root, _ = build_sharded_model(
        ckpt, lambda m: TrainModule(m, 1024, 0.0, context), info, mixed_precision="bf16" if cuda else "fp32"
    )
    strategy = DataParallelStep(root, info.device, info.dp_size, info.dp_group, "token_mean", context)
    batch = long_row(tokens)
    saved: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor):
        if not _is_param(t):
            mask = (
                t.dim() == 4 and t.shape[:2] == (1, 1) and t.shape[2] == t.shape[3]
            )  # SDPA keeps it as float
            saved[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), mask)
        return t

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        strategy.forward_backward([batch])
    result = {
        "rank": rank, "tokens": batch.num_tokens,
        "saved_mib": sum(n for n, m in saved.values() if not m) / 2**20,
        "masks_mib": sum(n for n, m in saved.values() if m) / 2**20,
        "peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else None,
    }  # fmt: skip
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    close_distributed()


def measure(cp: int, tokens: int, ckpt: str, cuda: bool = False) -> list[dict]:
    """One forward + backward of the long row on `cp` ranks; each rank's numbers (see the module docstring)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _rank_main, args=(cp, port, ckpt, tokens, cuda, out), nprocs=cp, start_method="spawn"
        )
        return [json.load(open(os.path.join(out, f"{r}.json"))) for r in range(cp)]


def _owned_attention(lengths: list[int], owned: list[list[range]]) -> list[int]:
    """Causal (query, key) pairs within samples whose query position each rank owns (padding: none)."""
    starts, pos = [], 0
    for n in lengths:
        starts += [pos] * n
        pos += n
    return [sum(p - starts[p] + 1 for r in ranges for p in r if p < pos) for ranges in owned]


def _rank_flops(args, batch, cp: int, rank: int, owner: list[int], units, weights) -> float:
    """Model FLOPs of one cp rank's step under Ulysses: its tokens and labels, its vision units, 1/cp of the
    row's attention."""
    from vlmtune.parallel.context_split import padded_length, shard_row
    from vlmtune.train.flops import model_flops

    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    labels = int(shard_row(batch, weights, cp=cp, rank=rank, args=args)[1].sum())
    grids = [u.grid for u, o in zip(units, owner) if o == rank]
    mine = model_flops(args, [padded_length(batch.num_tokens, cp) // cp], grids, label_tokens=labels)
    return mine.total - mine.decoder_attention + model_flops(args, lengths).decoder_attention / cp


def balance(batch, args, cps=(2, 4, 8)) -> dict:
    """Busiest rank over the mean, minus 1, for each kind of work (see the module docstring); `args`: the
    model the row is cut for."""
    import gpu_checks

    from vlmtune.models.qwen3_vl import args_from_hf_dict
    from vlmtune.parallel.context_split import assign_units, padded_length, shard_row, vision_units

    big = args_from_hf_dict(gpu_checks.model_config("8b", layers=36))
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    grids = [g for g in (batch.image_grid_thw, batch.video_grid_thw) if g is not None]
    units = vision_units(torch.cat(grids).tolist(), args.vision.spatial_merge_size)
    weights = (batch.targets[0] != -100).double()
    out = {}
    for cp in cps:
        chunk = padded_length(batch.num_tokens, cp) // cp
        half = padded_length(batch.num_tokens, 2 * cp) // (2 * cp)
        end = 2 * cp * half
        contiguous = [[range(r * chunk, (r + 1) * chunk)] for r in range(cp)]
        zigzag = [
            [range(r * half, (r + 1) * half), range(end - (r + 1) * half, end - r * half)] for r in range(cp)
        ]
        owner = assign_units(units, cp)
        work = {
            "label_tokens": [int(shard_row(batch, weights, cp=cp, rank=r, args=args)[1].sum()) for r in range(cp)],
            "vision_patches": [sum(u.patches for u, o in zip(units, owner) if o == r) for r in range(cp)],
            "step_flops_8b_ulysses": [_rank_flops(big, batch, cp, r, owner, units, weights) for r in range(cp)],
            "ring_attention_contiguous": _owned_attention(lengths, contiguous),
            "ring_attention_zigzag": _owned_attention(lengths, zigzag),
        }  # fmt: skip
        out[cp] = {k: max(v) / (sum(v) / cp) - 1 for k, v in work.items()}
    return out


def run(tokens: int, cps: list[int], size: dict, cuda: bool = False) -> dict:
    """Memory and FLOPs per rank at each cp size, and the balance of the split (see the module docstring)."""
    from vlmtune.models.qwen3_vl import load_config
    from vlmtune.testing import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as ckpt:
        make_tiny_checkpoint(ckpt, seed=0, assets=False, **size)
        args = load_config(ckpt)
        ranks = {cp: measure(cp, tokens, ckpt, cuda) for cp in cps}
    batch = long_row(tokens)
    base = max(r["saved_mib"] for r in ranks[cps[0]]) * cps[0]
    per_cp = {
        cp: {
            "saved_mib_max": max(r["saved_mib"] for r in rs),
            "saved_vs_one_rank": max(r["saved_mib"] for r in rs) / base if base else None,
            "masks_mib_max": max(r["masks_mib"] for r in rs),
            "peak_mib_max": max(r["peak_mib"] for r in rs) if cuda else None,
            "ranks": rs,
        }
        for cp, rs in ranks.items()
    }
    return {"tokens": batch.num_tokens, "size": size, "cp": per_cp, "balance": balance(batch, args)}


def table(result: dict) -> str:
    lines = [
        f"{result['tokens']} tokens in one packed row",
        "| cp | saved MiB, busiest rank | x one process | masks MiB (CPU path only) | CUDA peak MiB |",
        "|---|---|---|---|---|",
    ]
    for cp, r in result["cp"].items():
        peak = "-" if r["peak_mib_max"] is None else f"{r['peak_mib_max']:.0f}"
        lines.append(f"| {cp} | {r['saved_mib_max']:.1f} | {r['saved_vs_one_rank']:.3f} | {r['masks_mib_max']:.1f} | "
                     f"{peak} |")  # fmt: skip
    kinds = list(next(iter(result["balance"].values())))
    lines += [
        "",
        "busiest rank / mean - 1:",
        "",
        "| cp | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for cp, b in result["balance"].items():
        lines.append(f"| {cp} | " + " | ".join(f"{b[k]:.1%}" for k in kinds) + " |")
    return "\n".join(lines)


def gpu_section(dry: bool) -> dict:
    """For benchmarks/gpu.py: 64k tokens at every cp size of 1, 2, 4 that the visible GPUs allow (NCCL needs
    one GPU per rank); a dry run: the smoke sizes on gloo."""
    if dry:
        return run(1024, [1, 2], SMOKE_SIZE)
    gpus = torch.cuda.device_count()
    cps = [cp for cp in (1, 2, 4) if cp <= gpus]
    out = run(65536, cps, SIZE, cuda=True)
    out["skipped"] = [f"cp {cp}: needs {cp} GPUs, {gpus} visible" for cp in (1, 2, 4) if cp > gpus]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="length of the packed row")
    ap.add_argument("--cp", default="1,2,4", help="comma-separated cp sizes (processes each)")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny widths, 1024 tokens, cp 1,2: checks the code runs"
    )
    a = ap.parse_args()
    tokens, cps, size = (
        (1024, [1, 2], SMOKE_SIZE) if a.smoke else (a.tokens, [int(c) for c in a.cp.split(",")], SIZE)
    )
    result = run(tokens, cps, size)
    print(table(result))
    print(json.dumps({k: v for k, v in result.items() if k != "size"}))


if __name__ == "__main__":
    main()
