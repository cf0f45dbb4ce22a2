"""FSDP2 on 2 gloo ranks equals one process: gradients under accumulation, losses over 3 steps, and a rank
with text-only micro-batches does not hang while the other rank's micro-batches carry images."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from test_train_utils import grads, max_rel_diff, pack, random_sample, run_step, small_vocab_model, step_loss
from vlmtune import load_pretrained, save_pretrained
from vlmtune.parallel.mesh import close_distributed, init_distributed
from vlmtune.train.build import build_sharded_model
from vlmtune.train.config import TrainConfig
from vlmtune.train.freeze import apply_freeze
from vlmtune.train.optim import build_optimizer
from vlmtune.train.step import TrainModule

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
    info = init_distributed("cpu")
    root, model = build_sharded_model(ckpt, lambda m: TrainModule(m, 4), info, dtype=torch.float64)
    first_grads = {}
    for loss_type in ("token_mean", "sample_mean"):
        step_loss(root, step_batches(0)[rank], loss_type, dp_size=world)
        first_grads[loss_type] = grads(model)
        model.zero_grad(set_to_none=True)
    cfg = optim_config()
    optimizer = build_optimizer(model, cfg)
    losses = []
    for step in range(STEPS):
        r = run_step(root, optimizer, step_batches(step)[rank], dp_size=world, clip_grad=0.5, step=step)
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
    save_pretrained(small_vocab_model(torch.float64), d)
    return d


@pytest.mark.slow
def test_two_ranks_equal_one_process(small_ckpt, tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), small_ckpt, out), nprocs=2, join=True)
    fsdp = torch.load(out)

    model = load_pretrained(small_ckpt, dtype=torch.float64)
    root = TrainModule(model, 4)
    # (2 ranks, accumulation 2) == (1 process, accumulation 4) == (1 process, one micro-batch of 4)
    for loss_type in ("token_mean", "sample_mean"):
        step_loss(root, [b for rank in step_batches(0) for b in rank], loss_type)
        assert max_rel_diff(fsdp["grads"][loss_type], grads(model)) <= 1e-6
        model.zero_grad(set_to_none=True)
    all4 = [
        random_sample(k, n, answer=a, image=i)
        for k, n, a, i in ((0, 18, 3, True), (1, 11, 5, True), (2, 25, 2, False), (3, 9, 6, False))
    ]
    step_loss(root, [pack(all4)])
    assert max_rel_diff(fsdp["grads"]["token_mean"], grads(model)) <= 1e-6
    model.zero_grad(set_to_none=True)

    cfg = optim_config()
    optimizer = build_optimizer(model, cfg)
    losses = []
    for step in range(STEPS):
        micro = [b for rank in step_batches(step) for b in rank]
        r = run_step(root, optimizer, micro, clip_grad=0.5, step=step)
        losses.append(r.loss)
    assert losses[0] != losses[-1]  # the optimizer really moved the weights
    assert fsdp["losses"] == pytest.approx(losses, rel=1e-9)


def _frozen_worker(rank: int, world: int, port: int, ckpt: str, out: str, group: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    cfg = optim_config()
    setattr(cfg.freeze, group, True)
    info = init_distributed("cpu")
    root, model = build_sharded_model(
        ckpt,
        lambda m: TrainModule(m, 4),
        info,
        dtype=torch.float64,
        prepare=lambda m: apply_freeze(m, cfg.freeze),
    )
    step_loss(root, step_batches(1)[rank], dp_size=world)  # rank 1: text only
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
    cfg = optim_config()
    setattr(cfg.freeze, group, True)
    model = load_pretrained(small_ckpt, dtype=torch.float64)
    apply_freeze(model, cfg.freeze)
    micro = [b for r in step_batches(1) for b in r]
    step_loss(TrainModule(model, 4), micro)
    ref = grads(model)
    frozen_prefix = "language_model" if group == "text_decoder" else "visual.blocks"
    assert fsdp.keys() == ref.keys() and not any(k.startswith(frozen_prefix) for k in ref)
    assert max_rel_diff(fsdp, ref) <= 1e-6
