"""`vlmtune plan` for LoRA and QLoRA runs against what the code really allocates and saves, on the CPU.

The plan places the trainer's own adapters (train/lora.py `LoraSetup`) on a meta model, so these tests build
the same runs for real and compare:
- parameters, gradients and AdamW state byte for byte on 1 and 2 FSDP ranks (bf16 base, fp32 adapters),
  under tensor parallelism (2 ranks), and with QLoRA's NF4 decoder weights (1 and 2 ranks);
- activations byte for byte against what autograd keeps for backward (tests/test_plan.py's counter), for
  adapters in the decoder, the vision blocks and the mergers, a merger trained whole, adapter dropout, MoE
  experts and the router, and QLoRA, with activation checkpointing none and full, on text, image and video.
"""

from __future__ import annotations

import math

import pytest
import torch

from dist_utils import run_ranks
from test_plan import (
    BATCHES,
    BF16,
    FP32,
    allocated_states,
    checkpointing,
    micro_batch,
    tiny_model,
)
from vlmtune import save_pretrained
from vlmtune.models.qwen3_vl import load_config
from vlmtune.testing import storage_bytes
from vlmtune.train.config import TrainConfig
from vlmtune.train.lora import LoraSetup
from vlmtune.train.plan_activations import ActivationSpec, checkpointed_blocks, predict_activations
from vlmtune.train.plan_memory import Layout, Precision, build_meta_model, param_records, state_memory
from vlmtune.train.qlora import nf4_bytes, quantize_decoder
from vlmtune.train.step import TrainModule

MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


def lora_config(**lora) -> TrainConfig:
    cfg = TrainConfig()
    cfg.lora.rank = 8
    for key, value in lora.items():
        setattr(cfg.lora, key, value)
    return cfg


# ---------------------------------------------------------------------------- parameters, grads, optim


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny dense and MoE checkpoints with a 1024-token vocabulary."""
    from test_train_utils import small_vocab_model

    out = {}
    for kind, moe in (("dense", None), ("moe", MOE)):
        out[kind] = str(tmp_path_factory.mktemp(f"plan_lora_{kind}"))
        save_pretrained(small_vocab_model(torch.float32, moe=moe), out[kind])
    return out


STATE_RUNS = {  # the checkpoint, the lora: section of the run, the layout it runs on, mixed precision
    "fsdp1-fp32": ("dense", {"vision_projector": True, "modules_to_save": ["merger"]}, {}, "fp32"),
    "fsdp2-bf16": ("dense", {"vision_encoder": True}, {"dp_shard": 2}, "bf16"),
    "tp2": ("dense", {"vision_encoder": True, "vision_projector": True}, {"tp": 2}, "fp32"),
    "moe-ep2": ("moe", {"targets": ["all-linear", "router"]}, {"dp_shard": 2, "ep": 2}, "bf16"),
    "qlora1": ("dense", {"base_quant": "nf4"}, {}, "bf16"),
    "qlora2": ("dense", {"base_quant": "nf4", "modules_to_save": ["lm_head"]}, {"dp_shard": 2}, "bf16"),
    "cp2": ("dense", {"vision_projector": True}, {"cp": 2}, "bf16"),  # FSDP shards over dp_shard x cp
    "qlora-cp2": ("dense", {"base_quant": "nf4"}, {"cp": 2}, "bf16"),
}


def _lora_worker(rank, world, ckpt, lora, parallel, mixed_precision):
    """One training step of the run as the trainer builds it (context-parallel slices under cp)."""
    from test_train_utils import pack, random_sample
    from vlmtune.parallel.context import context_parallel
    from vlmtune.parallel.layout import ParallelConfig
    from vlmtune.parallel.mesh import init_distributed
    from vlmtune.train.build import build_sharded_model
    from vlmtune.train.optim import build_optimizer
    from vlmtune.train.qlora import build_quantized_model
    from vlmtune.train.step import DataParallelStep

    cfg = lora_config(**lora)
    args = load_config(ckpt)
    info = init_distributed("cpu", ParallelConfig(**parallel), args)
    compute = BF16 if mixed_precision == "bf16" else FP32
    setup = LoraSetup(cfg, args, seed=0, master_dtype=FP32, compute_dtype=compute)
    builder = build_quantized_model if cfg.lora.base_quant == "nf4" else build_sharded_model
    context = context_parallel(info, args)
    root, model = builder(
        ckpt, lambda m: TrainModule(m, 4, 0.0, context), info, mixed_precision=mixed_precision, lora=setup
    )
    step = DataParallelStep(root, info.device, info.dp_size, info.dp_group, "token_mean", context)
    step.forward_backward([pack([random_sample(rank // info.parallel.cp, 18, answer=3, image=True)])])
    optimizer = build_optimizer(model, cfg)
    optimizer.step()
    return allocated_states(model, optimizer)


def predicted_lora_states(ckpt, lora, layout, precision) -> dict:
    cfg, args = lora_config(**lora), load_config(ckpt)
    setup = LoraSetup(cfg, args, seed=0, master_dtype=precision.master, compute_dtype=precision.compute)
    model = build_meta_model(args, cfg.freeze, precision.master, setup)
    records = param_records(model, nf4=cfg.lora.base_quant == "nf4")
    s = state_memory(records, layout, precision, args=args)
    return {
        "params": s.params,
        "grads": s.grads,
        "optimizer": s.optimizer,
        "optimizer_host": s.optimizer_host,
    }


@pytest.mark.parametrize("run", list(STATE_RUNS))
def test_lora_state_bytes_are_exact(ckpts, run):
    kind, lora, parallel, mixed_precision = STATE_RUNS[run]
    world = math.prod(parallel.get(k, 1) for k in ("dp_shard", "tp", "cp"))
    measured = run_ranks(_lora_worker, world, ckpts[kind], lora, parallel, mixed_precision)
    precision = Precision(FP32, BF16 if mixed_precision == "bf16" else FP32, FP32)
    layout = Layout(**parallel)
    predicted = predicted_lora_states(ckpts[kind], lora, layout, precision)
    assert all(m == predicted for m in measured), (measured, predicted)


@pytest.mark.parametrize("shape", [(64, 64), (64, 256), (128, 64), (512, 1024), (1024, 4096)])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_nf4_bytes_are_what_torchao_allocates(shape, dtype):
    """A whole NF4 weight (one data-parallel rank); FSDP2's split of it is measured above (qlora2)."""
    from torchao.quantization import to_nf4

    from vlmtune.train.qlora import NF4_BLOCK, _scaler_block

    weight = torch.randn(shape, dtype=dtype)
    nf4 = to_nf4(weight, NF4_BLOCK, _scaler_block(shape, 1))
    assert nf4_bytes(shape, dtype.itemsize) == storage_bytes([nf4])
    assert nf4_bytes(shape, dtype.itemsize) < weight.numel() * dtype.itemsize / 3


# --------------------------------------------------------------------------------------- activations

ACTIVATION_RUNS = {  # (lora: section, MoE config)
    "decoder": ({}, None),
    "decoder-qv-dropout": ({"targets": ["q_proj", "v_proj"], "dropout": 0.1}, None),
    "every-group": ({"vision_encoder": True, "vision_projector": True}, None),
    "mergers-only": ({"text_decoder": False, "vision_projector": True}, None),
    "vision-fc2-dropout": (
        {"text_decoder": False, "vision_encoder": True, "targets": ["fc2"], "dropout": 0.1},
        None,
    ),
    "merger-trained-whole": ({"modules_to_save": ["merger"], "targets": ["o_proj"]}, None),
    "moe-experts-router": ({"targets": ["all-linear", "router"]}, MOE),
    "moe-attention": ({"targets": ["q_proj", "o_proj"]}, MOE),
    "qlora": ({"base_quant": "nf4"}, None),
}


def lora_model(dtype, lora: dict, moe=None):
    """A tiny model with the run's adapters, as the trainer places them (non-zero B), all in `dtype`; QLoRA's
    decoder Linears in NF4."""
    cfg = lora_config(**lora)
    model = tiny_model(dtype, moe)
    setup = LoraSetup(cfg, model.args, seed=0, master_dtype=dtype, compute_dtype=dtype)
    setup.apply(model)
    setup.after_load(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    if cfg.lora.base_quant == "nf4":
        assert len(quantize_decoder(model)) == 3 * 7  # every decoder projection of the 3 layers
    return model, setup


def lora_predicted_vs_measured(model, setup, batch, mode: str) -> tuple[float, int]:
    from test_plan import measure_saved

    args = model.args
    ckpt, attention_only = checkpointed_blocks(mode, args.vision.depth, args.text.num_hidden_layers)
    spec = ActivationSpec(
        args, micro_batch(batch), compute_bytes=setup.compute_dtype.itemsize, kernel="sdpa", lora=setup.spec,
        checkpointed=ckpt, attention_recompute=attention_only, loss_chunk=8,
    )  # fmt: skip
    with checkpointing(model, mode):
        measured = measure_saved(TrainModule(model, 8), model, batch)
    return predict_activations(spec).saved, measured


@pytest.mark.parametrize("run", list(ACTIVATION_RUNS))
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_lora_activations_are_exact(dtype, run):
    lora, moe = ACTIVATION_RUNS[run]
    model, setup = lora_model(dtype, lora, moe)
    for mode in ("none", "full"):
        for kind, make in BATCHES.items():
            predicted, measured = lora_predicted_vs_measured(model, setup, make(), mode)
            assert predicted == measured, (mode, kind, predicted, measured)
