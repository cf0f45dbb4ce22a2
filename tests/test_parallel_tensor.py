"""Tensor parallelism (DTensor, gloo, 2 CPU ranks) equals one process: losses and gradients over 3 steps."""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_ranks
from vlmtune import load_pretrained
from vlmtune.parallel.tensor import (
    ParallelError,
    validate_tensor_parallel,
    vocab_parallel_cross_entropy,
)

from model_inputs import build_sample, packed_row

STEPS = 3


def packed_batch():
    """Image + text + video samples in one row, labels on everything."""
    return packed_row(
        [
            build_sample([6, ("image", 4, 4), 3], 1),
            build_sample([11], 2),
            build_sample([4, ("video", 2, 4, 4), 2], 3),
        ]
    )


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train_steps(rank, world, ckpt, tp, use_vocab_parallel_loss):
    from torch.distributed.device_mesh import init_device_mesh

    from vlmtune.parallel.tensor import apply_tensor_parallel

    torch.manual_seed(0)
    model = load_pretrained(ckpt)
    if tp > 1:
        apply_tensor_parallel(
            model, init_device_mesh("cpu", (tp,)), gather_logits=not use_vocab_parallel_loss
        )
    if not use_vocab_parallel_loss:
        return run_steps(model, lambda m, b: m(**b).loss)

    def vocab_parallel_loss(m, b):
        from vlmtune.models.qwen3_vl.model import shift_labels

        out = m(**{k: v for k, v in b.items() if k != "labels"}, return_hidden=True)
        target = shift_labels(b["labels"], b["cu_seqlens"])[0]
        keep = target != -100
        return vocab_parallel_cross_entropy(out.hidden_states[0][keep], m.lm_head.weight, target[keep]).mean()

    return run_steps(model, vocab_parallel_loss)


def run_steps(model, loss_fn):
    """STEPS AdamW steps on the packed batch: losses of every step, full gradients of the first."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    batch = packed_batch()  # every rank sees the same batch: the step equals one process on that batch
    losses, grads = [], {}
    for step in range(STEPS):
        loss = loss_fn(model, batch)
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            grads = {n: full(p.grad).clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return losses, grads


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    return train_steps(0, 1, tiny_ckpt[0], 1, False)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.slow
@pytest.mark.parametrize("vocab_parallel_loss", [False, True], ids=["gathered_logits", "vocab_parallel_loss"])
def test_tp2_matches_single_process(tiny_ckpt, reference, vocab_parallel_loss):
    ref_losses, ref_grads = reference
    results = run_ranks(train_steps, 2, tiny_ckpt[0], 2, vocab_parallel_loss)
    for losses, grads in results:
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= 1e-5 * abs(b)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            assert rel(g, ref_grads[name]) <= 1e-4, name


def test_tp_validation_names_what_works(tiny_ckpt):
    from vlmtune.models.qwen3_vl import load_config

    args = load_config(tiny_ckpt[0])
    with pytest.raises(ParallelError, match="num_key_value_heads=2; .* divisible by 1, 2"):
        validate_tensor_parallel(args, 4)


def fsdp_tp_steps(rank, world, ckpt):
    """FSDP2 over dp=2 x TP over tp=2 on one 2-D mesh (4 ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from vlmtune.parallel.tensor import apply_tensor_parallel

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    model = load_pretrained(ckpt)
    apply_tensor_parallel(model, mesh["tp"])
    for block in [*model.visual.blocks.values(), *model.language_model.layers.values()]:
        fully_shard(block, mesh=mesh["dp_shard"])
    fully_shard(model, mesh=mesh["dp_shard"])
    return run_steps(model, lambda m, b: m(**b).loss)


@pytest.mark.slow
def test_fsdp2_x_tp2_matches_single_process(tiny_ckpt, reference):
    ref_losses, ref_grads = reference
    for losses, grads in run_ranks(fsdp_tp_steps, 4, tiny_ckpt[0]):
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= 1e-5 * abs(b)
        for name, g in grads.items():
            assert rel(g, ref_grads[name]) <= 1e-4, name
