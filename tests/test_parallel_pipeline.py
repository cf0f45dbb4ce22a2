"""Pipeline parallelism (torch.distributed.pipelining, gloo, CPU) equals one process over 3 steps.

Four packed micro-batches (image, video, text-only, image+text) with DeepStack; the token-mean loss of the
whole step. PP2 with 1F1B (DeepStack layer 1 on the second stage, so features travel), PP2 interleaved
(4 stages on 2 ranks) and PP2 x FSDP2 (4 ranks).
"""

from __future__ import annotations

import os

import pytest
import torch

from dist_utils import run_ranks
from vlmtune import load_pretrained
from vlmtune.errors import ParallelError
from vlmtune.models.qwen3_vl.model import shift_labels
from vlmtune.testing import make_tiny_checkpoint

from model_inputs import as_packed_batch, build_sample, packed_row

STEPS = 3
LENGTH = 64
MICROBATCHES = [
    [[5, ("image", 4, 4), 6], [7]],
    [[3, ("video", 2, 4, 4), 4]],
    [[12], [9], [5]],
    [[4, ("image", 4, 6), 2], [6]],
]


def microbatches():
    return [
        packed_row([build_sample(seg, 40 + 10 * i + j) for j, seg in enumerate(group)])
        for i, group in enumerate(MICROBATCHES)
    ]


def n_label_tokens(mbs):
    return sum(int((shift_labels(b["labels"], b["cu_seqlens"]) != -100).sum()) for b in mbs)


def reference(ckpt):
    model = load_pretrained(ckpt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    mbs = microbatches()
    n = n_label_tokens(mbs)
    losses, grads = [], {}
    for step in range(STEPS):
        total = 0.0
        for b in mbs:
            out = model(**{k: v for k, v in b.items() if k != "labels"}, return_hidden=True)
            target = shift_labels(b["labels"], b["cu_seqlens"])[0]
            keep = target != -100
            logits = model.lm_head(out.hidden_states[0][keep])
            loss = torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum") / n
            loss.backward()
            total += loss.item()
        losses.append(total)
        if step == 0:
            grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return losses, grads


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def pipelined(rank, world, ckpt, llm_pp_layers, schedule, dp):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from vlmtune.parallel.pipeline import build_pipeline, stack_microbatches

    pp = world // dp
    mesh = init_device_mesh("cpu", (pp, dp), mesh_dim_names=("pp", "dp_shard"))
    mbs = microbatches()
    n = n_label_tokens(mbs)

    def wrap(module):
        if dp == 1:
            return module
        for layer in module.model.language_model.layers.values():
            fully_shard(layer, mesh=mesh["dp_shard"], reshard_after_forward=False)
        return fully_shard(module, mesh=mesh["dp_shard"], reshard_after_forward=False)

    sched, modules = build_pipeline(
        lambda: load_pretrained(ckpt),
        mesh["pp"],
        llm_pp_layers=llm_pp_layers,
        vit_pp_layers=None,
        n_microbatches=len(mbs),
        loss_fn=lambda out, target: out.sum() / n,
        schedule=schedule,
        length=LENGTH,
        wrap=wrap,
    )
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    args, media = stack_microbatches([as_packed_batch(b) for b in mbs], LENGTH)
    target = torch.zeros(len(mbs), 1)
    losses, grads = [], {}
    for step in range(STEPS):
        for m in modules:
            m.media = media
        step_losses = []
        sched.step(*args, target=target, losses=step_losses)
        total = torch.tensor(sum(float(x) for x in step_losses), dtype=torch.float64)
        dist.broadcast(total, src=mesh["pp"].mesh[-1].item(), group=mesh["pp"].get_group())
        losses.append(total.item())
        if step == 0:
            grads = {
                k[len("model.") :]: full(p.grad).clone()
                for m in modules
                for k, p in m.named_parameters()
                if p.grad is not None
            }
        opt.step()
        opt.zero_grad()
    return losses, grads


@pytest.fixture(scope="module")
def pp_ckpt(tmp_path_factory):
    d = os.path.join(str(tmp_path_factory.mktemp("pp")), "m")
    make_tiny_checkpoint(d, seed=9, assets=False, text_layers=4, deepstack=(0, 1))
    return d


@pytest.fixture(scope="module")
def ref(pp_ckpt):
    return reference(pp_ckpt)


def check(results, ref):
    ref_losses, ref_grads = ref
    merged = {}
    for losses, grads in results:
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= 1e-5 * abs(b), (losses, ref_losses)
        merged.update(grads)
    assert merged.keys() == ref_grads.keys()
    for name, g in merged.items():
        r = ref_grads[name]
        assert ((g - r).norm() / r.norm()).item() <= 1e-4, name


@pytest.mark.slow
def test_pp2_1f1b_matches_single_process(pp_ckpt, ref):
    check(run_ranks(pipelined, 2, pp_ckpt, [1, 3], "1f1b", 1), ref)


@pytest.mark.slow
def test_pp2_interleaved_matches_single_process(pp_ckpt, ref):
    check(run_ranks(pipelined, 2, pp_ckpt, [1, 1, 1, 1], "interleaved", 1), ref)


@pytest.mark.slow
def test_pp2_x_fsdp2_matches_single_process(pp_ckpt, ref):
    check(run_ranks(pipelined, 4, pp_ckpt, [2, 2], "1f1b", 2), ref)


def test_stage_plan_errors():
    from vlmtune.parallel.pipeline import plan_stages

    with pytest.raises(ParallelError, match="sums to 5; the model has 4"):
        plan_stages(4, 3, [2, 3], None, 2)
    with pytest.raises(ParallelError, match="multiple of pp=2"):
        plan_stages(4, 3, [1, 1, 2], None, 2)
    with pytest.raises(ParallelError, match=r"entirely on the first stage, e.g. \[3, 0\]"):
        plan_stages(4, 3, [2, 2], [2, 1], 2)
