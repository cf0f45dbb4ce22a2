"""Pipeline parallelism (torch.distributed.pipelining, gloo, CPU) equals one process over 3 steps.

Four packed micro-batches (image, video, text-only, image+text) with DeepStack; the token-mean loss of the
whole step (+ the MoE router aux loss). PP2 with 1F1B (DeepStack layer 1 on the second stage, so features
travel), PP2 interleaved (4 stages on 2 ranks), PP2 x FSDP2 (4 ranks), the vision tower split over two
stages, and a MoE model whose pooled aux loss spans the stages. Every gradient of the first step and the
losses of all steps equal one process's.
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


def reference(ckpt, aux_coef: float = 0.0):
    """One process: the step's token-mean loss (+ aux_coef x the router aux loss, each micro-batch's weighted
    by its share of the label tokens, as the trainer does)."""
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
            if aux_coef:
                loss = loss + aux_coef * int(keep.sum()) / n * out.aux_loss
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


def position_weights(batches, n, moe: bool = False, aux_coef: float = 0.0):
    """The schedule's target: 1/n at every trained position (the step's token-mean loss), 0 at padding;
    for MoE one more column, the micro-batch's aux-loss weight."""
    rows = []
    for b in batches:
        keep = (b.targets[0] != -100).double()
        w = F.pad(keep / n, (0, LENGTH - b.num_tokens))
        rows.append(F.pad(w, (0, 1), value=aux_coef * float(keep.sum()) / n) if moe else w)
    return torch.stack(rows).float()


def pipelined(rank, world, ckpt, layout: dict):
    """`layout`: llm (llm_pp_layers), schedule, dp (FSDP ranks per stage), and optionally vit, aux_coef,
    dummy_vision (text-only micro-batches run the stage's part of the tower on a dummy grid, times 0)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from vlmtune.parallel.pipeline import build_pipeline, set_batches

    dp = layout.get("dp", 1)
    mesh = init_device_mesh("cpu", (world // dp, dp), mesh_dim_names=("pp", "dp_shard"))
    mbs = microbatches()

    def wrap(module):
        if dp == 1:
            return module
        for layer in module.model.language_model.layers.values():
            fully_shard(layer, mesh=mesh["dp_shard"], reshard_after_forward=False)
        return fully_shard(module, mesh=mesh["dp_shard"], reshard_after_forward=False)

    sched, modules = build_pipeline(
        lambda: load_pretrained(ckpt), mesh["pp"], llm_pp_layers=layout["llm"], vit_pp_layers=layout.get("vit"),
        n_microbatches=len(mbs), schedule=layout.get("schedule", "1f1b"), length=LENGTH, wrap=wrap,
    )  # fmt: skip
    for m in modules:
        m.dummy_vision = layout.get("dummy_vision", False)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    batches = [as_packed_batch(b) for b in mbs]
    moe = modules[0].model.args.is_moe
    target = position_weights(batches, n_label_tokens(mbs), moe, layout.get("aux_coef", 0.0))
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
def moe_ckpt(tmp_path_factory):
    d = os.path.join(str(tmp_path_factory.mktemp("pp_moe")), "m")
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    make_tiny_checkpoint(d, seed=9, assets=False, text_layers=3, deepstack=(0, 1), moe=moe)
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
    check(run_ranks(pipelined, 2, pp_ckpt, dict(llm=[1, 3])), ref)


@pytest.mark.slow
def test_pp2_interleaved_matches_single_process(pp_ckpt, ref):
    check(run_ranks(pipelined, 2, pp_ckpt, dict(llm=[1, 1, 1, 1], schedule="interleaved")), ref)


@pytest.mark.slow
def test_pp2_x_fsdp2_matches_single_process(pp_ckpt, ref):
    check(run_ranks(pipelined, 4, pp_ckpt, dict(llm=[2, 2], dp=2)), ref)


@pytest.mark.slow
def test_vision_tower_split_over_two_stages(pp_ckpt, ref):
    """Vision blocks 0-1 (both DeepStack blocks) on stage 0 alone, block 2, the merger, the embedding and
    every decoder layer on stage 1: vision hidden states and dense DeepStack features travel. The text-only
    micro-batch runs each stage's part of the tower on a dummy grid (as under FSDP), which changes nothing."""
    check(run_ranks(pipelined, 2, pp_ckpt, dict(llm=[0, 4], vit=[2, 1], dummy_vision=True)), ref)


@pytest.mark.slow
def test_moe_router_aux_loss_pooled_across_stages(moe_ckpt):
    """The aux loss pools assignments and probabilities over all sparse layers (not a sum of per-layer
    losses): stage 0's statistics travel to the last stage, which forms the loss; its gradient comes back
    to stage 0's routers. Every gradient equals one process's."""
    aux = 0.5
    ref = reference(moe_ckpt, aux)
    check(run_ranks(pipelined, 2, moe_ckpt, dict(llm=[1, 2], aux_coef=aux)), ref)


def test_stage_plan_errors(pp_ckpt):
    from vlmtune.models.qwen3_vl import args_from_hf_dict, load_config
    from vlmtune.parallel.pipeline import plan_stages
    from vlmtune.testing import tiny_config_dict

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
    with pytest.raises(ParallelError, match="without a gap"):
        plan_stages(args, [0, 0, 2, 2], [2, 0, 1, 0], 2)
    with pytest.raises(ParallelError, match=r"before the last vision stage \(1\) hold none, e.g. \[0, 4\]"):
        plan_stages(args, [1, 3], [2, 1], 2)
    tied = args_from_hf_dict(tiny_config_dict(text_layers=4, tie_word_embeddings=True))
    with pytest.raises(ParallelError, match="same rank in different stages"):
        plan_stages(tied, [0, 2, 1, 1], [2, 1, 0, 0], 2)  # embedding on stage 1, lm_head on 3: both rank 1


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


@pytest.mark.parametrize(
    "llm, vit", [([1, 2], None), ([0, 3], [2, 1])], ids=["decoder_split", "vision_split"]
)
def test_stages_in_sequence_equal_the_whole_model_bitwise(moe_ckpt, llm, vit):
    """One process, no padding: the stages' own forwards, chained by hand (the plan's boundary tensors in
    order), give the whole model's final hidden states and its pooled router aux loss bit for bit — the dense
    DeepStack add equals the sparse one, and the statistics fold the layers in the same order."""
    from vlmtune.models.qwen3_vl.moe import pooled_aux_loss, router_statistics
    from vlmtune.parallel.pipeline import plan_stages, prune, stage_inputs

    whole = load_pretrained(moe_ckpt)
    batch = as_packed_batch(microbatches()[0])
    out = whole(**batch.model_inputs(), return_hidden=True)
    x = stage_inputs(batch, batch.num_tokens, "cpu")
    sent, stats = {}, None
    for plan in plan_stages(whole.args, llm, vit, 2):
        stage = prune(load_pretrained(moe_ckpt), plan)
        media = x.media if plan.first else {k: v for k, v in x.media.items() if k.endswith("grid_thw")}
        got = stage(
            x.input_ids, position_ids=x.position_ids, cu_seqlens=x.cu_seqlens, return_hidden=True,
            **(media if stage.visual is not None else {}), **{k: sent[k] for k in plan.inputs if k != "router_stats"},
        )  # fmt: skip
        if plan.layers:
            stats = router_statistics(stage, x.row_weights, into=stats)
        sent = {"vision_states": got.vision_states, "hidden_states": got.hidden_states,
                "deepstack_embeds": got.deepstack_embeds}  # fmt: skip
    assert torch.equal(got.hidden_states, out.hidden_states)
    assert torch.equal(pooled_aux_loss(stats, batch.num_tokens * 3), out.aux_loss)
