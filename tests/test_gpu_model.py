"""CUDA paths of the dense model: FlashAttention varlen for packed rows and bf16 forward/backward.

Skipped where no CUDA device is present (conftest); never faked.
"""

from __future__ import annotations

import pytest
import torch

from vlmtune import load_pretrained
from vlmtune.models.qwen3_vl.attention import attention, build_mask, varlen_attn

from model_inputs import build_sample, ours_kwargs, packed_row

pytestmark = pytest.mark.gpu


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_flash_matches_masked_sdpa(causal):
    assert varlen_attn is not None, "torch.nn.attention.varlen is required for the CUDA packed path"
    torch.manual_seed(0)
    cu = torch.tensor([0, 37, 100, 256], dtype=torch.int32, device="cuda")
    q = torch.randn(1, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    fast = attention(q, k, v, causal=causal, cu_seqlens=cu, max_seqlen=156)
    mask = build_mask(256, 256, causal=causal, attention_mask=None, cu_seqlens=cu, device=q.device)
    ref = attention(q.float(), k.float(), v.float(), causal=causal, cu_seqlens=cu, mask=mask)
    assert rel(fast, ref) <= 2e-2


def test_bf16_cuda_packed_forward_backward_close_to_fp32_cpu(tiny_ckpt):
    path, _ = tiny_ckpt
    samples = [
        build_sample([6, ("image", 4, 4), 3], 1),
        build_sample([11], 2),
        build_sample([4, ("video", 2, 4, 4)], 3),
    ]
    row = packed_row(samples)
    ids, pos, cu = row["input_ids"], row["position_ids"], row["cu_seqlens"]
    media = {k: row[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}
    ref = load_pretrained(path)(ids, position_ids=pos, cu_seqlens=cu, **media).logits
    model = load_pretrained(path, dtype=torch.bfloat16, device="cuda")
    cuda_media = {k: v.cuda() for k, v in media.items()}
    out = model(ids.cuda(), position_ids=pos.cuda(), cu_seqlens=cu.cuda(), labels=ids.cuda(), **cuda_media)
    assert rel(out.logits.cpu(), ref) <= 3e-2
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    alone = model(**{k: v.cuda() for k, v in ours_kwargs(samples[1]).items()}).logits[0]
    assert rel(out.logits[0, cu[1] : cu[2]], alone) <= 3e-2
