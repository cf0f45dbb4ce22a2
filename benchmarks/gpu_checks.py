"""GPU checks shared by `benchmarks/gpu.py` and the gpu-marked tests: FlashAttention varlen and the grouped
GEMM against plain references, and host syncs per layer counted with `torch.cuda.set_sync_debug_mode`.

Every function also runs on the CPU at toy sizes (`gpu.py --dry-run`): the attention then takes the SDPA
path with a mask and the sync count is None (the sync debug mode is CUDA's). Sizes are arguments, so the
tests use small ones and the benchmark the issue's.
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from vlmtune.models.qwen3_vl import args_from_hf_dict
from vlmtune.models.qwen3_vl.attention import attention, uses_varlen
from vlmtune.models.qwen3_vl.moe import expert_mlp, grouped_mm_supported
from vlmtune.models.qwen3_vl.rope import text_rope_cos_sin, vision_rope_cos_sin
from vlmtune.models.qwen3_vl.text import DecoderLayer
from vlmtune.models.qwen3_vl.vision import VisionBlock, vision_segments
from vlmtune.testing import tiny_config_dict

# Widths of the public Qwen3-VL-8B-Instruct and Qwen3-VL-30B-A3B-Instruct config.json files (decoder cut to
# `layers`); "toy" is the tests' tiny model (CPU dry runs).
WIDTHS = {
    "8b": dict(text_hidden=4096, heads=32, kv_heads=8, head_dim=128, mrope_section=(24, 20, 20)),
    "30b-a3b": dict(text_hidden=2048, heads=32, kv_heads=4, head_dim=128, mrope_section=(24, 20, 20)),
}
REAL_VISION = dict(vision_hidden=1152, vision_depth=27, vision_heads=16, deepstack=(8, 16, 24))
MOE_30B = dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1)
TOY_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)


def model_config(kind: str, layers: int = 4) -> dict:
    """config.json dict of `kind` ("8b", "30b-a3b", "toy", "toy-moe") with `layers` decoder layers."""
    if kind.startswith("toy"):
        return tiny_config_dict(text_layers=layers, moe=TOY_MOE if kind == "toy-moe" else None)
    moe = MOE_30B if kind == "30b-a3b" else None
    cfg = tiny_config_dict(
        text_layers=layers, num_position_embeddings=2304, moe=moe, **WIDTHS[kind], **REAL_VISION
    )
    text, vision = cfg["text_config"], cfg["vision_config"]
    text["intermediate_size"] = 6144 if moe else 12288
    text["rope_parameters"]["rope_theta"] = 5_000_000.0
    text["max_position_embeddings"] = 262144
    vision["intermediate_size"] = 4304
    return cfg


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of `fn()` in ms over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def split_lengths(total: int, parts: int, seed: int = 0) -> list[int]:
    """`parts` uneven lengths (multiples of 8) summing to `total`."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(parts, generator=g) + 0.5
    lengths = [int(x) // 8 * 8 for x in (w / w.sum() * total)]
    lengths[-1] += total - sum(lengths)
    return lengths


# -- FlashAttention varlen ---------------------------------------------------------------------------------
def _reference_attention(q, k, v, lengths: list[int], causal: bool) -> torch.Tensor:
    """Per-sample fp32 SDPA: `[1, H, L, D]` inputs -> `[1, L, H, D]`."""
    outs, start = [], 0
    for n in lengths:
        seg = [t[:, :, start : start + n].float() for t in (q, k, v)]
        outs.append(F.scaled_dot_product_attention(*seg, is_causal=causal, enable_gqa=True))
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2)


def varlen_check(device, *, tokens: int, samples: int, hq: int, hkv: int, head_dim: int, causal: bool,
                 repeats: int = 5) -> dict:  # fmt: skip
    """`attention()` on a packed row (FlashAttention varlen on CUDA bf16) forward and backward against
    per-sample fp32 SDPA: relative errors of the output and of the q/k/v gradients, and its time."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device).manual_seed(0)
    lengths = split_lengths(tokens, samples)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)

    def leaf(h):
        return torch.randn(1, h, tokens, head_dim, device=device, generator=g).to(dtype).requires_grad_()

    q, k, v = leaf(hq), leaf(hkv), leaf(hkv)
    grad = torch.randn(1, tokens, hq, head_dim, device=device, generator=g).to(dtype)

    def fwd_bwd():
        out = attention(q, k, v, causal=causal, cu_seqlens=cu, max_seqlen=max(lengths))
        out.backward(grad)
        return out

    out = fwd_bwd()
    got = [out.detach(), *(t.grad.clone() for t in (q, k, v))]
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = _reference_attention(*leaves, lengths, causal)
    ref.backward(grad.float())
    want = [ref.detach(), *(t.grad for t in leaves)]
    errors = {name: rel(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
    ms = timed_ms(fwd_bwd, device, repeats)
    return {"path": "varlen" if uses_varlen(q) else "sdpa+mask", "dtype": str(dtype), "tokens": tokens,
            "samples": samples, "max_seqlen": max(lengths), "rel_err": errors, "fwd_bwd_ms": ms}  # fmt: skip


# -- grouped GEMM ------------------------------------------------------------------------------------------
def grouped_gemm_check(device, *, tokens: int, experts: int, hidden: int, inter: int, top_k: int,
                       empty: int, repeats: int = 3) -> dict:  # fmt: skip
    """`expert_mlp` forward and backward with `empty` experts receiving no token: the grouped GEMM against
    the per-expert loop (bf16), relative errors and both times."""
    device = torch.device(device)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, generator=g).bfloat16()
    gate_up = (torch.randn(experts, hidden, 2 * inter, device=device, generator=g) * 0.02).bfloat16()
    down = (torch.randn(experts, inter, hidden, device=device, generator=g) * 0.02).bfloat16()
    logits = torch.randn(tokens, experts, device=device, generator=g)
    logits[:, :empty] = float("-inf")  # these experts are never chosen
    top, index = logits.softmax(-1).topk(top_k, dim=-1)
    weights = (top / top.sum(-1, keepdim=True)).bfloat16()
    grad = torch.randn(tokens, hidden, device=device, generator=g).bfloat16()
    if not grouped_mm_supported(x, gate_up, down):
        return {"grouped_mm": "not supported on this device/dtype"}
    results, times = {}, {}
    for grouped in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, gate_up, down, weights)]

        def fwd_bwd(leaves=leaves, grouped=grouped):
            for t in leaves:
                t.grad = None
            out, counts = expert_mlp(*leaves[:3], index, leaves[3], grouped=grouped)
            out.backward(grad)
            return out, counts

        out, counts = fwd_bwd()
        results[grouped] = [out.detach(), *(t.grad.clone() for t in leaves)]
        times["grouped_ms" if grouped else "loop_ms"] = timed_ms(fwd_bwd, device, repeats)
    names = ("out", "dx", "dgate_up", "ddown", "dweights")
    errors = {n: rel(a, b) for n, a, b in zip(names, results[True], results[False])}
    return {"shape": dict(tokens=tokens, experts=experts, hidden=hidden, inter=inter, top_k=top_k),
            "empty_experts": int((counts == 0).sum()), "rel_err": errors, **times}  # fmt: skip


# -- host syncs per layer ----------------------------------------------------------------------------------
def count_syncs(fn, device: torch.device) -> int | None:
    """Synchronizing CUDA calls made by `fn()` (after a warm-up call), from the sync debug mode's warnings;
    None off CUDA."""
    fn()
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def packed_layer_inputs(args, device, dtype, tokens: int, samples: int) -> tuple:
    """A packed row for a decoder layer: hidden states, rotary cos/sin, and the attention keywords."""
    lengths = split_lengths(tokens, samples)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    pos = torch.cat([torch.arange(n) for n in lengths]).expand(3, 1, tokens).to(device)
    t = args.text
    cos, sin = text_rope_cos_sin(pos, t.head_dim, t.rope_theta, t.mrope_section, dtype)
    x = torch.randn(1, tokens, t.hidden_size, device=device, dtype=dtype)
    return x, (cos, sin), {"cu_seqlens": cu, "max_seqlen": max(lengths)}


def vision_block_inputs(args, device, dtype, images: int, side: int) -> tuple:
    """`images` square images of `side x side` patches for a vision block."""
    grids = [[1, side, side]] * images
    cu, max_seqlen = vision_segments(grids, device)
    v = args.vision
    cos, sin = vision_rope_cos_sin(torch.tensor(grids), v.head_dim, v.rope_theta, v.spatial_merge_size)
    x = torch.randn(images * side * side, v.hidden_size, device=device, dtype=dtype)
    return x, (cos.to(device), sin.to(device)), {"cu_seqlens": cu, "max_seqlen": max_seqlen}


def layer_sync_counts(device, *, dense: str, moe: str, tokens: int, samples: int, images: int,
                      side: int) -> dict:  # fmt: skip
    """Host syncs in one forward + backward of a dense decoder layer (`dense` widths), a MoE decoder layer
    (`moe` widths, no expert parallelism) and a vision block, on packed inputs (0 is the target)."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {}
    for name, kind in (("dense decoder layer", dense), ("MoE decoder layer", moe), ("vision block", dense)):
        args = args_from_hf_dict(model_config(kind))  # only one layer is built
        torch.manual_seed(0)
        with torch.device(device):
            module = VisionBlock(args.vision) if name == "vision block" else DecoderLayer(args.text, 0)
        module = module.to(dtype)
        if name == "vision block":
            x, rope, kw = vision_block_inputs(args, device, dtype, images, side)
        else:
            x, rope, kw = packed_layer_inputs(args, device, dtype, tokens, samples)
        x.requires_grad_()

        def fwd_bwd(module=module, x=x, rope=rope, kw=kw, vision=name == "vision block"):
            y = (
                module(x, *rope, kw["cu_seqlens"], None, kw["max_seqlen"])
                if vision
                else module(x, *rope, **kw)
            )
            y.float().pow(2).mean().backward()

        out[name] = count_syncs(fwd_bwd, device)
        del module
    return out
