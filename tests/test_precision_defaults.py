"""`train.mixed_precision: auto` is bf16 on CUDA and fp32 on the CPU; fp32 on CUDA only when set explicitly,
with a warning; `model.compile` is a key, off by default."""

from __future__ import annotations

import logging

import pytest
import torch

from vlmtune.train.config import from_dict


def raw(**train) -> dict:
    return {
        "output_dir": "run",
        "model": {"init_from_hf": "ckpt"},
        "data": {"dataset": "train.json"},
        "train": {"train_iters": 1, **train},
    }


@pytest.mark.parametrize(
    "cuda, train, dtype, expected",
    [
        (False, {}, "float32", "fp32"),  # CPU: compute in the master dtype
        (True, {}, "float32", "bf16"),  # CUDA: bf16 compute, float32 master weights
        (True, {"device": "cpu"}, "float32", "fp32"),  # CUDA present but the run is on the CPU
        (True, {}, "bfloat16", "fp32"),  # bf16 master weights already compute in bf16
        (False, {"device": "cuda"}, "float32", "bf16"),  # decided by the configured device
        (True, {"mixed_precision": "bf16"}, "float32", "bf16"),
        (False, {"mixed_precision": "bf16"}, "float32", "bf16"),
    ],
)
def test_auto_is_bf16_on_cuda(monkeypatch, cuda, train, dtype, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    r = raw(**train)
    r["model"]["dtype"] = dtype
    cfg = from_dict(r, check_paths=False)
    assert cfg.train.mixed_precision == expected
    assert cfg.to_dict()["train"]["mixed_precision"] == expected  # checkpoints record what ran


def test_explicit_fp32_on_cuda_runs_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.WARNING, logger="vlmtune.train.config"):
        cfg = from_dict(raw(mixed_precision="fp32"), check_paths=False)
    assert cfg.train.mixed_precision == "fp32"
    assert "fp32 on CUDA computes attention on the math path" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlmtune.train.config"):
        from_dict(raw(), check_paths=False)  # auto: no warning, bf16
    assert caplog.text == ""


def test_compile_key():
    assert from_dict(raw(), check_paths=False).model.compile is False
    r = raw()
    r["model"]["compile"] = True
    assert from_dict(r, check_paths=False).model.compile is True
