"""Pipeline parallelism (torch.distributed.pipelining, gloo, CPU) equals one process over 3 steps.

Four packed micro-batches (image, video, text-only, image+text) with DeepStack; the token-mean loss of the
whole step. PP2 with 1F1B (DeepStack layer 1 on the second stage, so features travel), PP2 interleaved
(4 stages on 2 ranks) and PP2 x FSDP2 (4 ranks).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

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


def position_weights(batches, n):
    """The schedule's target: 1/n at every trained position (the step's token-mean loss), 0 at padding."""
    return torch.stack(
        [F.pad((b.targets[0] != -100).double() / n, (0, LENGTH - b.num_tokens)) for b in batches]
    )


def pipelined(rank, world, ckpt, llm_pp_layers, schedule, dp):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from vlmtune.parallel.pipeline import build_pipeline, set_batches

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
        schedule=schedule,
        length=LENGTH,
        wrap=wrap,
    )
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    batches = [as_packed_batch(b) for b in mbs]
    target = position_weights(batches, n).float()
    losses, grads = [], {}
    for step in range(STEPS):
        set_batches(modules, batches, LENGTH, "cpu")
        step_losses = []
        sched.step(mb=torch.arange(len(mbs)), target=target, losses=step_losses)
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


def test_stage_plan_errors(pp_ckpt):
    from vlmtune.models.qwen3_vl import load_config
    from vlmtune.parallel.pipeline import plan_stages

    args = load_config(pp_ckpt)  # 4 decoder layers, 3 vision blocks
    with pytest.raises(ParallelError, match="sums to 5; the model has 4"):
        plan_stages(args, [2, 3], None, 2)
    with pytest.raises(ParallelError, match="multiple of pp=2"):
        plan_stages(args, [1, 1, 2], None, 2)
    with pytest.raises(ParallelError, match="entries summing to the vision depth 3"):
        plan_stages(args, [2, 2], [2, 2], 2)
    with pytest.raises(
        ParallelError, match=r"stage\(s\) \[1\] would hold no vision block and no decoder layer"
    ):
        plan_stages(args, [4, 0], None, 2)


def test_stage_plan_sends_only_what_the_next_stage_needs(pp_ckpt):
    """DeepStack features (layers 0 and 1) travel until the stage holding layer 1; the vision tower and the
    embedding sit on the first stage, the norm and the lm_head on the last."""
    from vlmtune.models.qwen3_vl import load_config
    from vlmtune.parallel.pipeline import plan_stages

    plans = plan_stages(load_config(pp_ckpt), [1, 1, 1, 1], None, 2)
    assert [p.outputs for p in plans] == [
        ("hidden_states", "deepstack_embeds"),
        ("hidden_states",),
        ("hidden_states",),
        ("losses",),
    ]
    assert [p.inputs for p in plans] == [(), *[p.outputs for p in plans[:-1]]]
    assert [(p.blocks, p.layers, p.embeds) for p in plans] == [
        ([0, 1, 2], [0], True), ([], [1], False), ([], [2], False), ([], [3], False),
    ]  # fmt: skip
