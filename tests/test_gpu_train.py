"""`vlmtune train` on CUDA through the real NCCL process group and FSDP2, and generation on CUDA without
padding (skipped where no CUDA device is present; test_infer_generate covers a left-padded batch on CUDA)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from test_train_utils import make_run_checkpoint, run_config
from vlmtune import load_pretrained
from vlmtune.demo import make_dataset
from vlmtune.infer import stream
from vlmtune.train.config import from_dict
from vlmtune.train.metrics import read_metrics
from vlmtune.train.trainer import train

from model_inputs import build_sample, ours_kwargs

pytestmark = pytest.mark.gpu


def test_vlmtune_train_runs_on_cuda_through_nccl(tmp_path, monkeypatch):
    ckpt = make_run_checkpoint(str(tmp_path / "ckpt"))
    data = str(tmp_path / "data")
    make_dataset(data, n_train=12, n_eval=2, seed=0)
    raw = run_config(tmp_path / "run", ckpt, data, steps=3, train={"device": "cuda"})
    cfg = from_dict(raw)
    assert cfg.train.mixed_precision == "bf16"  # the CUDA default
    backends = []
    init = dist.init_process_group
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend, **kw: backends.append(backend) or init(backend, **kw)
    )
    summary = train(cfg)
    assert backends == ["nccl"] and summary["step"] == 3
    records = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)


def test_unpadded_bf16_generation_tracks_fp32(tiny_ckpt):
    """One prompt, no padding: prefill runs causal SDPA without a mask, decode reads the cache."""
    path, _ = tiny_ckpt
    batch = ours_kwargs(build_sample([7, ("image", 4, 4), 5], 3))
    batch["input_ids"] = batch["input_ids"][0]
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_pretrained(path, dtype=dtype, device="cuda").eval()
        runs[dtype] = list(stream(model, batch, max_new_tokens=5))
    want, got = runs[torch.float32], runs[torch.bfloat16]
    assert len(got) == len(want) == 5
    # Same prefix fed to both: compare the first step exactly where the inputs agree.
    ref = want[0].logits.float()
    assert (got[0].logits.float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
