"""Expert parallelism (all-to-all over 2 gloo ranks) equals one process: losses and gradients over 3 steps.

Each rank trains on its own sample (data parallel over the ep ranks); the one-process reference trains on
both samples packed in one row with the same token-mean loss. Non-expert gradients are summed over ranks
(as FSDP's reduction of a token-mean loss does); expert gradients already hold both ranks' tokens.
"""

from __future__ import annotations

import os

import pytest
import torch

from dist_utils import run_ranks
from vlmtune import load_pretrained
from vlmtune.errors import ParallelError
from vlmtune.models.qwen3_vl import get_rope_index
from vlmtune.models.qwen3_vl.model import shift_labels
from vlmtune.testing import make_tiny_checkpoint

from model_inputs import build_sample, packed_row

STEPS = 3
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[1])
SAMPLES = ([6, ("image", 4, 4), 9], [4, ("video", 2, 4, 4), 7])


def sample(i):
    s = build_sample(SAMPLES[i], 20 + i)
    s["position_ids"] = get_rope_index(
        s["input_ids"], s["image_grid_thw"], s["video_grid_thw"], image_token_id=151655, video_token_id=151656
    )[0]
    return {k: v for k, v in s.items() if v is not None and k != "mm_token_type_ids"}


def packed():
    row = packed_row([build_sample(SAMPLES[i], 20 + i) for i in range(2)])
    return {k: v for k, v in row.items() if k != "labels"}


def token_loss_sum(model, batch):
    out = model(**batch, return_hidden=True)
    target = shift_labels(batch["input_ids"], batch.get("cu_seqlens"))[0]
    keep = target != -100
    logits = model.lm_head(out.hidden_states[0][keep])
    return torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum"), int(keep.sum())


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(rank, world, ckpt, ep):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from vlmtune.parallel.expert import apply_expert_parallel

    model = load_pretrained(ckpt)
    if ep > 1:
        apply_expert_parallel(model, init_device_mesh("cpu", (ep,)))
        local = model.language_model.layers["0"].mlp.experts.gate_up_proj.to_local()
        assert local.shape[0] == MOE["num_experts"] // ep
    batch = packed() if ep == 1 else sample(rank)
    n_total = sum(shift_labels(sample(i)["input_ids"])[0].ne(-100).sum().item() for i in range(2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    losses, grads = [], {}
    for step in range(STEPS):
        loss_sum, _ = token_loss_sum(model, batch)
        (loss_sum / n_total).backward()
        total = loss_sum.detach().clone()
        if ep > 1:
            dist.all_reduce(total)
            for p in model.parameters():
                if p.grad is not None and not hasattr(p.grad, "to_local"):
                    dist.all_reduce(p.grad)  # data-parallel reduction of the token-mean loss
        losses.append(total.item() / n_total)
        if step == 0:
            grads = {n: full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    return losses, grads


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("moe_ep"))
    make_tiny_checkpoint(os.path.join(d, "m"), seed=5, moe=MOE, assets=False)
    return os.path.join(d, "m")


@pytest.mark.slow
def test_ep2_matches_single_process(moe_ckpt):
    ref_losses, ref_grads = train(0, 1, moe_ckpt, 1)
    for losses, grads in run_ranks(train, 2, moe_ckpt, 2):
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= 1e-5 * abs(b)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            r = ref_grads[name]
            assert ((g - r).norm() / r.norm()).item() <= 1e-4, name


def test_ep_must_divide_experts():
    from vlmtune.parallel.expert import validate_expert_parallel

    with pytest.raises(ParallelError, match=r"use one of \[1, 2, 4\]"):
        validate_expert_parallel(4, 3)
