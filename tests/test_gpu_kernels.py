"""CUDA kernels at real shapes and host syncs per layer (skipped where no CUDA device is present).

The checks are `benchmarks/gpu_checks.py`'s, the functions `benchmarks/gpu.py` reports with; here at sizes
that keep the tests short, with the thresholds they must meet.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_checks as checks  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "shape",
    [
        dict(hq=32, hkv=8, head_dim=128, causal=True, samples=8),  # the 8B decoder (GQA)
        dict(hq=16, hkv=16, head_dim=72, causal=False, samples=6),  # the vision tower
    ],
    ids=["decoder", "vision"],
)
def test_varlen_forward_backward_match_per_sample_fp32_sdpa(shape):
    r = checks.varlen_check("cuda", tokens=4096, repeats=1, **shape)
    assert r["path"] == "varlen", "packed bf16 attention on CUDA must run FlashAttention varlen"
    assert all(err <= 2e-2 for err in r["rel_err"].values()), r["rel_err"]


def test_grouped_gemm_at_real_shapes_with_empty_experts_matches_the_loop():
    r = checks.grouped_gemm_check(
        "cuda", tokens=4096, experts=128, hidden=2048, inter=768, top_k=8, empty=20, repeats=1
    )
    if "rel_err" not in r:
        pytest.skip(f"grouped GEMM: {r['grouped_mm']} (needs sm80+ and bf16)")
    assert r["empty_experts"] >= 20
    assert all(err <= 2e-2 for err in r["rel_err"].values()), r["rel_err"]


def test_layers_run_forward_and_backward_without_a_host_sync():
    """A packed decoder layer (dense and MoE, no expert parallelism) and a vision block: zero synchronizing
    CUDA calls, counted by `torch.cuda.set_sync_debug_mode` (an `.item()`, `bincount`, `nonzero` or a
    `repeat_interleave` without `output_size` would each count)."""
    counts = checks.layer_sync_counts(
        "cuda", dense="toy", moe="toy-moe", tokens=512, samples=4, images=3, side=8
    )
    assert counts == {"dense decoder layer": 0, "MoE decoder layer": 0, "vision block": 0}


def test_the_sync_count_sees_a_sync():
    """Negative control: the counter is not blind."""
    x = torch.arange(10, device="cuda")
    assert checks.count_syncs(lambda: torch.bincount(x), torch.device("cuda")) >= 1
