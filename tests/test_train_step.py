"""Freeze groups, activation checkpointing, NaN handling and the lr schedule."""

from __future__ import annotations

import pytest
import torch

from test_train_utils import grads, max_rel_diff, pack, random_sample, run_step, small_vocab_model, step_loss
from vlmtune.parallel.fsdp import apply_activation_checkpointing
from vlmtune.train.config import TrainConfig
from vlmtune.train.freeze import GROUP_PREFIXES, apply_freeze, freeze_groups
from vlmtune.train.optim import build_optimizer, lr_factor
from vlmtune.train.run_setup import accumulation_steps, total_steps
from vlmtune.train.step import TrainModule

CPU = torch.device("cpu")


def batches():
    return [pack([random_sample(0, 20, image=True), random_sample(1, 12)]), pack([random_sample(2, 16)])]


def test_groups_are_exactly_the_documented_parameters():
    model = small_vocab_model(torch.float32, tie_word_embeddings=False)
    groups = freeze_groups(model)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(sum(groups.values(), [])) == sorted(names)  # every parameter in exactly one group
    enc, proj, text = (set(groups[g]) for g in ("vision_encoder", "vision_projector", "text_decoder"))
    assert {
        "visual.patch_embed.proj.weight",
        "visual.patch_embed.proj.bias",
        "visual.pos_embed.weight",
    } <= enc
    assert enc == {
        n for n in names if n.startswith(("visual.patch_embed.", "visual.pos_embed.", "visual.blocks."))
    }
    assert any(n.startswith("visual.blocks.2.") for n in enc)
    assert proj == {n for n in names if n.startswith(("visual.merger.", "visual.deepstack_merger_list."))}
    assert {
        "visual.deepstack_merger_list.0.linear_fc1.weight",
        "visual.deepstack_merger_list.1.norm.weight",
    } <= proj
    assert {"lm_head.weight", "language_model.embed_tokens.weight", "language_model.norm.weight"} <= text
    assert text == {n for n in names if n.startswith(("language_model.", "lm_head."))}
    assert set(GROUP_PREFIXES) == {"vision_encoder", "vision_projector", "text_decoder"}


@pytest.mark.parametrize("group", ["vision_encoder", "vision_projector", "text_decoder"])
def test_frozen_group_unchanged_and_without_optimizer_state(group):
    model = small_vocab_model(torch.float32)
    cfg = TrainConfig()
    cfg.optim.lr = 1e-2
    setattr(cfg.freeze, group, True)
    apply_freeze(model, cfg.freeze)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, cfg)
    root = TrainModule(model, chunk_size=8)
    for step in range(2):
        run_step(root, optimizer, batches(), step=step)
    frozen = set(freeze_groups(model)[group])
    with_state = {id(p) for p in optimizer.state}
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, before[name]), name  # bitwise
            assert id(p) not in with_state and not p.requires_grad
        else:
            assert not torch.equal(p, before[name]), name
            assert id(p) in with_state


def test_per_group_learning_rates():
    model = small_vocab_model(torch.float32)
    cfg = TrainConfig()
    cfg.optim.lr, cfg.optim.vision_encoder_lr, cfg.optim.vision_projector_lr = 1e-3, 1e-4, 0.0
    opt = build_optimizer(model, cfg)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["vision_encoder"] == 1e-4 and lrs["vision_projector"] == 0.0 and lrs["text_decoder"] == 1e-3
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if g["name"].endswith("no_decay"))


@pytest.mark.parametrize("mode", ["full", "every_other", "selective"])
def test_activation_checkpointing_keeps_gradients(mode):
    ref = small_vocab_model(torch.float64)
    step_loss(TrainModule(ref, chunk_size=8), batches())
    model = small_vocab_model(torch.float64)
    names = [n for n, _ in model.named_parameters()]
    apply_activation_checkpointing(model, mode)
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints keep their keys
    step_loss(TrainModule(model, chunk_size=8), batches())
    assert max_rel_diff(grads(model), grads(ref)) <= 1e-10


def test_non_finite_step_is_skipped_or_stops(caplog):
    model = small_vocab_model(torch.float32)
    cfg = TrainConfig()
    opt = build_optimizer(model, cfg)
    root = TrainModule(model)
    with torch.no_grad():
        model.language_model.norm.weight[0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    r = run_step(root, opt, batches(), on_nan="skip", step=7)
    assert r.skipped
    out = caplog.text
    assert "step 7: non-finite loss" in out and "sample ids: ['0', '1', '2']" in out
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) or (torch.isnan(p).any() and torch.isnan(before[n]).any())
    with pytest.raises(FloatingPointError, match=r"step 8: non-finite .* sample ids: \['0', '1', '2'\]"):
        run_step(root, opt, batches(), on_nan="stop", step=8)


def test_schedule_warmup_and_decay():
    cfg = TrainConfig()
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps = 1.0, 0.1, 10
    assert lr_factor(0, 110, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert lr_factor(110, 110, cfg) == pytest.approx(0.1)
    cfg.optim.schedule = "linear"
    assert lr_factor(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(35, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.75)
    cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.warmup_fraction = "constant", 0, 0.5
    assert lr_factor(10, 100, cfg) == pytest.approx(11 / 50) and lr_factor(70, 100, cfg) == 1.0


def test_accumulation_and_step_count_from_the_global_batch():
    cfg = TrainConfig()
    cfg.train.micro_batch_tokens = 1000
    assert accumulation_steps(cfg, 50, 400, world=2) == 1  # no global batch: one micro-batch per step
    cfg.train.global_batch_tokens = 8000
    assert accumulation_steps(cfg, 50, 400, world=2) == 4  # 8000 / (1000 * 2 ranks)
    cfg.train.global_batch_tokens, cfg.train.global_batch_samples = 0, 64
    # 400 samples in 50 micro-batches on each of 2 ranks: 4 per micro-batch; 64 / (4 * 2) = 8
    assert accumulation_steps(cfg, 50, 400, world=2) == 8
    cfg.train.epochs = 2.0
    assert total_steps(cfg, 50, 8) == 12  # 2 epochs * (50 // 8) steps
    cfg.train.train_iters = 7
    assert total_steps(cfg, 50, 8) == 7
