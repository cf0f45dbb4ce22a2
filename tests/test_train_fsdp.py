"""FSDP2 on 2 gloo ranks equals one process: gradients under accumulation, losses over 3 steps, and a rank
with text-only micro-batches does not hang while the other rank's micro-batches carry images."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from test_train_utils import grads, max_rel_diff, pack, random_sample, small_vocab_model
from vlmtune.train.config import TrainConfig
from vlmtune.train.optim import build_optimizer
from vlmtune.train.step import TrainModule, forward_backward, train_step

STEPS = 3


def step_batches(step: int) -> list[list[dict]]:
    """Micro-batches of one step, in rank order: rank 0 gets two image samples, rank 1 two text-only ones."""
    s = [
        random_sample(10 * step + 0, 18, answer=3, image=True),
        random_sample(10 * step + 1, 11, answer=5, image=True),
        random_sample(10 * step + 2, 25, answer=2),
        random_sample(10 * step + 3, 9, answer=6),
    ]
    return [[pack([s[0]]), pack([s[1]])], [pack([s[2]]), pack([s[3]])]]


def optim_config() -> TrainConfig:
    cfg = TrainConfig()
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.clip_grad = 1e-2, 0.1, 0.5
    return cfg


def _worker(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # two ranks on a shared CPU: oversubscribed threads slow everything down
    from vlmtune.parallel.fsdp import build_sharded_model
    from vlmtune.parallel.mesh import close_distributed, init_distributed

    info = init_distributed("cpu")
    root, model = build_sharded_model(
        ckpt, lambda m: TrainModule(m, "token_mean", 4), info, info.device, dtype=torch.float64
    )
    first_grads = {}
    for loss_type in ("token_mean", "sample_mean"):
        root.loss_type = loss_type
        forward_backward(root, step_batches(0)[rank], info.device, world)
        first_grads[loss_type] = grads(model)
        model.zero_grad(set_to_none=True)
    root.loss_type = "token_mean"
    cfg = optim_config()
    optimizer = build_optimizer(model, cfg)
    losses = []
    for step in range(STEPS):
        r = train_step(
            root, optimizer, step_batches(step)[rank], device=info.device, dp_size=world,
            clip_grad=cfg.optim.clip_grad, on_nan="stop", step=step,
        )  # fmt: skip
        losses.append(r.loss)
    if rank == 0:
        torch.save({"grads": first_grads, "losses": losses}, out)
    close_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("small_vocab"))
    small_vocab_model(torch.float64).save_pretrained(d)
    return d


@pytest.mark.slow
def test_two_ranks_equal_one_process(small_ckpt, tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), small_ckpt, out), nprocs=2, join=True)
    fsdp = torch.load(out)

    from vlmtune.models.qwen3_vl import Qwen3VL

    model = Qwen3VL.from_pretrained(small_ckpt, dtype=torch.float64)
    root = TrainModule(model, "token_mean", 4)
    cpu = torch.device("cpu")
    # (2 ranks, accumulation 2) == (1 process, accumulation 4) == (1 process, one micro-batch of 4)
    for loss_type in ("token_mean", "sample_mean"):
        root.loss_type = loss_type
        forward_backward(root, [b for rank in step_batches(0) for b in rank], cpu, 1)
        assert max_rel_diff(fsdp["grads"][loss_type], grads(model)) <= 1e-6
        model.zero_grad(set_to_none=True)
    root.loss_type = "token_mean"
    all4 = [
        random_sample(k, n, answer=a, image=i)
        for k, n, a, i in ((0, 18, 3, True), (1, 11, 5, True), (2, 25, 2, False), (3, 9, 6, False))
    ]
    forward_backward(root, [pack(all4)], cpu, 1)
    assert max_rel_diff(fsdp["grads"]["token_mean"], grads(model)) <= 1e-6
    model.zero_grad(set_to_none=True)

    cfg = optim_config()
    optimizer = build_optimizer(model, cfg)
    losses = []
    for step in range(STEPS):
        micro = [b for rank in step_batches(step) for b in rank]
        r = train_step(root, optimizer, micro, device=cpu, dp_size=1, clip_grad=0.5, on_nan="stop", step=step)
        losses.append(r.loss)
    assert losses[0] != losses[-1]  # the optimizer really moved the weights
    assert fsdp["losses"] == pytest.approx(losses, rel=1e-9)


def _frozen_worker(rank: int, world: int, port: int, ckpt: str, out: str, group: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from vlmtune.parallel.fsdp import build_sharded_model
    from vlmtune.parallel.mesh import close_distributed, init_distributed
    from vlmtune.train.freeze import apply_freeze

    cfg = optim_config()
    setattr(cfg.freeze, group, True)
    info = init_distributed("cpu")
    root, model = build_sharded_model(
        ckpt, lambda m: TrainModule(m, "token_mean", 4), info, info.device, dtype=torch.float64,
        prepare=lambda m: apply_freeze(m, cfg.freeze),
    )  # fmt: skip
    forward_backward(root, step_batches(1)[rank], info.device, world)  # rank 1: text only
    g = grads(model)
    if rank == 0:
        torch.save(g, out)
    close_distributed()


@pytest.mark.slow
@pytest.mark.parametrize("group", ["text_decoder", "vision_encoder"])
def test_frozen_groups_on_two_ranks_with_a_text_only_rank(small_ckpt, tmp_path, group):
    """No hang when one rank has only text while the other's images need the vision backward."""
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_frozen_worker, args=(2, _free_port(), small_ckpt, out, group), nprocs=2, join=True)
    fsdp = torch.load(out)

    from vlmtune.models.qwen3_vl import Qwen3VL
    from vlmtune.train.freeze import apply_freeze

    cfg = optim_config()
    setattr(cfg.freeze, group, True)
    model = Qwen3VL.from_pretrained(small_ckpt, dtype=torch.float64)
    apply_freeze(model, cfg.freeze)
    micro = [b for r in step_batches(1) for b in r]
    forward_backward(TrainModule(model, "token_mean", 4), micro, torch.device("cpu"), 1)
    ref = grads(model)
    frozen_prefix = "language_model" if group == "text_decoder" else "visual.blocks"
    assert fsdp.keys() == ref.keys() and not any(k.startswith(frozen_prefix) for k in ref)
    assert max_rel_diff(fsdp, ref) <= 1e-6
