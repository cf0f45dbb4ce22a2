"""Context parallelism: the host-side split of a packed row (slices, vision units, the feature exchange), the
layout's validation, and the data-parallel step under cp on gloo against one process — every gradient of
the first step and the losses of two AdamW steps, dense and MoE (router aux loss pooled over the cp ranks)."""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_ranks
from vlmtune.constants import IGNORE_INDEX
from vlmtune.errors import ParallelError
from vlmtune.models.qwen3_vl import args_from_hf_dict
from vlmtune.parallel.context import context_sizes
from vlmtune.parallel.context_split import assign_units, shard_row, vision_units
from vlmtune.parallel.layout import ParallelConfig, resolve
from vlmtune.testing import make_tiny_checkpoint, tiny_config_dict

from model_inputs import IMAGE, VIDEO, as_packed_batch, build_sample, packed_row

ARGS = args_from_hf_dict(tiny_config_dict())  # 4 query / 2 key-value heads


def micro_batches():
    """A long video (4 frame-pairs) packed with text and an image; an image + text row; a text-only row with
    labels only at its end (the first cp slice has none); a wide video (2 frame-pairs) alone. Odd lengths, so
    cp pads."""
    s = build_sample
    text_only = packed_row([s([13], 6), s([8], 7)])
    text_only["labels"][:, :15] = IGNORE_INDEX
    return [
        as_packed_batch(
            packed_row([s([5, ("video", 4, 4, 4), 7], 1), s([9], 2), s([3, ("image", 4, 8), 4], 3)])
        ),
        as_packed_batch(packed_row([s([4, ("image", 4, 4), 6], 4), s([11], 5)])),
        as_packed_batch(text_only),
        as_packed_batch(packed_row([s([2, ("video", 2, 4, 8), 5], 8)])),
    ]


# ------------------------------------------------------------------------------------------ host side
def test_units_split_videos_into_frame_pairs_and_balance_patches():
    units = vision_units([[1, 4, 8], [3, 4, 4]], merge=2)
    assert [(u.patch_start, u.patches, u.feature_start, u.features, u.grid) for u in units] == [
        (0, 32, 0, 8, (1, 4, 8)), (32, 16, 8, 4, (1, 4, 4)), (48, 16, 12, 4, (1, 4, 4)), (64, 16, 16, 4, (1, 4, 4)),
    ]  # fmt: skip
    assert assign_units(units, 2) == [0, 1, 1, 0]  # 48 patches each
    big = vision_units([[1, 16, 16], [1, 4, 4]], merge=2)
    assert assign_units(big, 4) == [0, 1]  # an image larger than a rank's share runs whole on one rank


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_shards_rebuild_the_row_and_every_feature_reaches_its_token(cp):
    batch = micro_batches()[0]
    weights = torch.rand(batch.num_tokens, dtype=torch.float64)
    shards = [shard_row(batch, weights, cp=cp, rank=r, args=ARGS) for r in range(cp)]
    length = shards[0][0].length
    assert length % cp == 0 and 0 <= length - batch.num_tokens < cp
    ids = torch.cat([s.input_ids for s, _ in shards], 1)
    assert torch.equal(ids[:, : batch.num_tokens], batch.input_ids) and not ids[:, batch.num_tokens :].any()
    targets = torch.cat([s.targets for s, _ in shards], 1)
    assert (targets[:, batch.num_tokens :] == IGNORE_INDEX).all()
    assert torch.equal(torch.cat([w for _, w in shards])[: batch.num_tokens], weights)
    positions = torch.cat([s.position_ids for s, _ in shards], 2)
    assert torch.equal(positions[:, :, : batch.num_tokens], batch.position_ids)
    cu = shards[0][0].cu_seqlens
    assert cu[-1] == length and (cu[-2] == batch.num_tokens or length == batch.num_tokens)

    # Replay the all-to-all on the host: rank r sends the global indexes of its features.
    pixels = torch.cat([batch.pixel_values, batch.pixel_values_videos])
    units = vision_units(torch.cat([batch.image_grid_thw, batch.video_grid_thw]).tolist(), merge=2)
    owner = assign_units(units, cp)
    sent = []
    for r, (shard, _) in enumerate(shards):
        own = [u for u, o in zip(units, owner) if o == r]
        feats = torch.cat(
            [torch.arange(u.feature_start, u.feature_start + u.features) for u in own]
            or [torch.zeros(0, dtype=torch.long)]
        )
        if own:  # the rank's patches are its units' rows, in order
            assert torch.equal(
                shard.pixel_values,
                torch.cat([pixels[u.patch_start : u.patch_start + u.patches] for u in own]),
            )
        sent.append(feats[shard.exchange.send_order].split(shard.exchange.send_splits))
    index = torch.cat([(batch.input_ids[0] == t).nonzero().squeeze(1) for t in (IMAGE, VIDEO)])
    received = set()
    for s, (shard, _) in enumerate(shards):
        got = torch.cat([sent[r][s] for r in range(cp)])
        assert [len(sent[r][s]) for r in range(cp)] == shard.exchange.recv_splits
        assert torch.equal(shard.exchange.recv_positions + shard.start, index[got])
        received |= set(got.tolist())
    assert received == set(range(index.numel()))  # every feature exactly where one slice needs it


def test_text_only_rows_have_no_exchange():
    shard, _ = shard_row(micro_batches()[2], torch.ones(21), cp=2, rank=1, args=ARGS)
    assert shard.exchange is None and shard.pixel_values is None


def test_validation_names_the_sizes_that_work():
    assert context_sizes(ARGS) == [1, 2, 4]  # 2 divides the 2 key/value heads; 4 repeats them
    assert context_sizes(ARGS, tp=2) == [1, 2]
    assert resolve(ParallelConfig(cp=2), 8, ARGS).dp_shard == 4
    with pytest.raises(ParallelError, match=r"parallel.cp=3 .* cp can be one of 1, 2, 4"):
        resolve(ParallelConfig(cp=3), 3, ARGS)
    with pytest.raises(
        ParallelError, match=r"parallel.cp=4 does not fit 2 query / 1 key-value heads .* 1, 2$"
    ):
        resolve(ParallelConfig(cp=4, tp=2), 8, ARGS)
    with pytest.raises(ParallelError, match="parallel.cp > 1 with parallel.pp > 1 is not supported"):
        resolve(ParallelConfig(cp=2, pp=2, llm_pp_layers=[2, 1]), 4, ARGS)
    with pytest.raises(
        ParallelError, match=r"dp_replicate x tp x pp x cp = 4 does not divide the world size 6"
    ):
        resolve(ParallelConfig(cp=4), 6, ARGS)


# ------------------------------------------------------------------------------------------ gloo
def train_steps(rank, world, ckpt, parallel: dict, loss_type: str, build: dict | None = None, steps: int = 2):
    """`steps` AdamW steps of the trainer's data-parallel strategy on this data shard's micro-batches:
    losses of every step, full gradients of the first. `build`: more `build_sharded_model` keywords."""
    from vlmtune.models.qwen3_vl import load_config
    from vlmtune.parallel.context import context_parallel
    from vlmtune.parallel.mesh import init_distributed
    from vlmtune.train.build import build_sharded_model
    from vlmtune.train.step import DataParallelStep, TrainModule

    args = load_config(ckpt)
    info = init_distributed("cpu", ParallelConfig(**parallel), args)
    context = context_parallel(info, args)
    aux = 0.05 if args.is_moe else 0.0
    root, model = build_sharded_model(ckpt, lambda m: TrainModule(m, 64, aux, context), info, **(build or {}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    strategy = DataParallelStep(root, info.device, info.dp_size, info.dp_group, loss_type, context)
    micro = micro_batches()[info.dp_rank :: info.dp_size]
    losses, grads = [], {}
    for step in range(steps):
        losses.append(strategy.forward_backward(micro)[0])
        if step == 0:
            for name, p in model.named_parameters():
                grads[name] = (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
        optimizer.step()
        optimizer.zero_grad()
    return losses, grads


def assert_matches(results, reference) -> None:
    ref_losses, ref_grads = reference
    for losses, grads in results:
        for a, b in zip(losses, ref_losses, strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (losses, ref_losses)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            rel = float((g - ref_grads[name]).norm() / ref_grads[name].norm().clamp(min=1e-30))
            assert rel <= 1e-4, (name, rel)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    dense = str(tmp_path_factory.mktemp("cp_dense"))
    make_tiny_checkpoint(dense, seed=0, assets=False)
    moe = str(tmp_path_factory.mktemp("cp_moe"))
    make_tiny_checkpoint(
        moe, seed=0, assets=False, moe=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    )
    return {"dense": dense, "moe": moe}


@pytest.mark.slow
def test_cp2_dense_equals_one_process(checkpoints):
    """Also with `selective` recompute (the kernel inside the all-to-alls) and every decoder layer compiled
    as one graph around them (`fullgraph=True`, the eager backend on the CPU)."""
    reference = run_ranks(train_steps, 1, checkpoints["dense"], {}, "token_mean")[0]
    build = {"activation_checkpointing": "selective", "compile": True}
    assert_matches(run_ranks(train_steps, 2, checkpoints["dense"], {"cp": 2}, "token_mean", build), reference)


@pytest.mark.slow
def test_cp2_x_dp_shard2_with_ep2_moe_equals_one_process(checkpoints):
    """4 ranks: 2 data shards x 2 cp ranks, experts over ep 2 and FSDP-sharded over dp_shard/ep x cp; the
    sample-mean loss and the router aux loss (statistics summed over the cp ranks)."""
    reference = run_ranks(train_steps, 1, checkpoints["moe"], {}, "sample_mean")[0]
    results = run_ranks(train_steps, 4, checkpoints["moe"], {"cp": 2, "dp_shard": 2, "ep": 2}, "sample_mean")
    assert_matches(results, reference)
