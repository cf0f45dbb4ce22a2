"""Mixed precision through FSDP2: bf16 compute with fp32 master weights and fp32 reductions tracks fp32, with
and without activation checkpointing; on CUDA this also runs flash varlen attention for packed rows."""

from __future__ import annotations

import pytest
import torch

from test_train_utils import pack, random_sample, run_step, small_vocab_model
from vlmtune import save_pretrained
from vlmtune.parallel.mesh import close_distributed, init_distributed
from vlmtune.train.build import build_sharded_model
from vlmtune.train.config import TrainConfig
from vlmtune.train.optim import build_optimizer
from vlmtune.train.step import TrainModule


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("ac", ["none", "full"])
def test_bf16_fsdp_step_tracks_fp32(tmp_path, ac, device):
    d = str(tmp_path / "ckpt")
    save_pretrained(small_vocab_model(torch.float32), d)
    batches = [pack([random_sample(0, 40, image=True), random_sample(1, 30)]), pack([random_sample(2, 50)])]
    cfg = TrainConfig()
    cfg.optim.lr = 1e-3
    info = init_distributed(device)
    try:
        losses = {}
        for mp in ("fp32", "bf16"):
            root, model = build_sharded_model(
                d, lambda m: TrainModule(m), info, mixed_precision=mp, activation_checkpointing=ac
            )
            assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
            opt = build_optimizer(model, cfg)
            losses[mp] = [run_step(root, opt, batches, step=s, device=info.device).loss for s in range(3)]
        assert losses["bf16"][-1] < losses["bf16"][0]
        assert losses["bf16"] == pytest.approx(losses["fp32"], rel=3e-2)
    finally:
        close_distributed()
