"""`vlmtune plan` predictions against what the code really allocates and saves, on the CPU.

- parameters, gradients and AdamW state: byte for byte what FSDP2 (1 and 2 gloo ranks) and tensor
  parallelism (2 ranks) allocate, counted by storage;
- activations: exactly the bytes autograd keeps for backward (a `saved_tensors_hooks` counter,
  deduplicated by storage, counting only what is still alive after the forward), for activation
  checkpointing none and full, on the tiny model and on a model of Qwen3-VL-8B widths with 2 decoder layers
  and 3 vision blocks, on text, image and video micro-batches.
"""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch

from dist_utils import run_ranks
from vlmtune import save_pretrained
from vlmtune.models.qwen3_vl import Qwen3VL, args_from_hf_dict, load_config
from vlmtune.parallel.fsdp import apply_activation_checkpointing
from vlmtune.testing import plain_tensors, storage_bytes, tiny_config_dict
from vlmtune.train.config import FreezeConfig
from vlmtune.train.flops import Trainable
from vlmtune.train.freeze import apply_freeze
from vlmtune.train.loss import count_labels, step_normalizers, token_weights
from vlmtune.train.plan_activations import (
    ActivationSpec,
    MicroBatch,
    checkpointed_blocks,
    predict_activations,
)
from vlmtune.train.plan_memory import Layout, Precision, build_meta_model, param_records, state_memory
from vlmtune.train.step import TrainModule

from model_inputs import as_packed_batch, build_sample, packed_row

# ------------------------------------------------------------------------------- measuring real memory


def allocated_states(model, optimizer) -> dict:
    state = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    steps = [v for s in optimizer.state.values() for k, v in s.items() if k == "step"]
    return {
        "params": storage_bytes(model.parameters()),
        "grads": storage_bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer": storage_bytes(state),
        "optimizer_host": storage_bytes(steps),
    }


def measure_saved(root, model, batch) -> int:
    """Bytes autograd keeps for backward after the forward of `batch` (parameters excluded)."""
    params = {t.untyped_storage().data_ptr() for p in model.parameters() for t in plain_tensors(p)}
    refs = []

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    counts = count_labels(batch)
    weights = token_weights(batch, counts, step_normalizers([counts]), "token_mean")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = root(batch, weights)
    alive = [t for r in refs if r() is not None for t in plain_tensors(r())]  # freed ones kept no memory
    total = storage_bytes(t for t in alive if t.untyped_storage().data_ptr() not in params)
    del loss
    return total


def micro_batch(batch) -> MicroBatch:
    cu = batch.cu_seqlens.tolist()
    grids = []
    for key in ("image_grid_thw", "video_grid_thw"):
        if getattr(batch, key) is not None:
            grids += [tuple(g) for g in getattr(batch, key).tolist()]
    return MicroBatch([b - a for a, b in zip(cu, cu[1:])], grids, count_labels(batch).tokens)


# ---------------------------------------------------------------------------- parameters, grads, optim


def _one_step(model, root, rank, cfg):
    from test_train_utils import pack, random_sample, step_loss
    from vlmtune.train.optim import build_optimizer

    step_loss(root, [pack([random_sample(rank, 18, answer=3, image=True)])])
    optimizer = build_optimizer(model, cfg)
    optimizer.step()
    return optimizer


def _fsdp_worker(rank, world, ckpt, mixed_precision, freeze_vision):
    from vlmtune.parallel.mesh import init_distributed
    from vlmtune.train.build import build_sharded_model
    from vlmtune.train.config import TrainConfig

    cfg = TrainConfig()
    cfg.freeze.vision_encoder = freeze_vision
    info = init_distributed("cpu")
    root, model = build_sharded_model(
        ckpt, lambda m: TrainModule(m, 4), info,
        mixed_precision=mixed_precision, prepare=lambda m: apply_freeze(m, cfg.freeze),
    )  # fmt: skip
    return allocated_states(model, _one_step(model, root, rank, cfg))


def _tp_worker(rank, world, ckpt):
    from torch.distributed.device_mesh import init_device_mesh

    from vlmtune import load_pretrained
    from vlmtune.parallel.tensor import apply_tensor_parallel
    from vlmtune.train.config import TrainConfig

    model = load_pretrained(ckpt)
    apply_tensor_parallel(model, init_device_mesh("cpu", (world,)), gather_logits=False)
    return allocated_states(model, _one_step(model, TrainModule(model, 4), rank, TrainConfig()))


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    from test_train_utils import small_vocab_model

    d = str(tmp_path_factory.mktemp("plan_small"))
    save_pretrained(small_vocab_model(torch.float32), d)
    return d


def predicted_states(ckpt, layout, precision, freeze=None, dp_rank: int = 0) -> dict:
    args = load_config(ckpt)
    records = param_records(build_meta_model(args, freeze))
    s = state_memory(records, layout, precision, args=args, dp_rank=dp_rank)
    return {
        "params": s.params,
        "grads": s.grads,
        "optimizer": s.optimizer,
        "optimizer_host": s.optimizer_host,
    }


FP32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize(
    "world, mixed_precision, freeze_vision", [(1, "fp32", False), (2, "bf16", True)], ids=["1rank", "2ranks"]
)
def test_fsdp_state_bytes_are_exact(small_ckpt, world, mixed_precision, freeze_vision):
    measured = run_ranks(_fsdp_worker, world, small_ckpt, mixed_precision, freeze_vision)
    precision = Precision(FP32, BF16 if mixed_precision == "bf16" else FP32, FP32)
    freeze = FreezeConfig(vision_encoder=freeze_vision)
    predicted = predicted_states(small_ckpt, Layout(dp_shard=world), precision, freeze)
    assert all(m == predicted for m in measured), (measured, predicted)
    assert (
        predicted["grads"] < predicted["params"]
        if freeze_vision
        else predicted["grads"] == predicted["params"]
    )


def test_fsdp_padding_of_uneven_shards(small_ckpt):
    """FSDP2 pads dim 0 of every parameter to a multiple of the shard count: 3 ranks, dims of 64 and 1024."""
    measured = run_ranks(_fsdp_worker, 3, small_ckpt, "fp32", False)
    fp32 = Precision(FP32, FP32, FP32)
    predicted = [predicted_states(small_ckpt, Layout(dp_shard=3), fp32, dp_rank=r) for r in range(3)]
    assert measured == predicted
    unpadded = sum(p.numel() for p in Qwen3VL(load_config(small_ckpt)).parameters()) * 4
    assert predicted[0]["params"] * 3 > unpadded  # the padding is real ...
    assert sum(p["optimizer"] for p in predicted) == 2 * unpadded  # ... AdamW's state has none
    assert predicted[2]["optimizer"] < predicted[0]["optimizer"]


def test_tensor_parallel_state_bytes_are_exact(small_ckpt):
    measured = run_ranks(_tp_worker, 2, small_ckpt)
    predicted = predicted_states(small_ckpt, Layout(dp_shard=1, tp=2), Precision(FP32, FP32, FP32))
    assert all(m == predicted for m in measured), (measured, predicted)


# --------------------------------------------------------------------------------------- activations

BATCHES = {
    "text": lambda: as_packed_batch(packed_row([build_sample([40], 1), build_sample([23], 2)])),
    "image": lambda: as_packed_batch(
        packed_row([build_sample([6, ("image", 4, 8), 3], 1), build_sample([11], 2)])
    ),
    "video": lambda: as_packed_batch(
        packed_row([build_sample([4, ("video", 2, 4, 4), 2], 3), build_sample([9], 4)])
    ),
}


@contextlib.contextmanager
def checkpointing(model, mode: str):
    apply_activation_checkpointing(model, mode)
    try:
        yield
    finally:
        for module in model.modules():
            module.__dict__.pop("forward", None)  # back to the class's forward


def predicted_vs_measured(model, batch, mode: str, freeze=None) -> tuple[float, int]:
    args = model.args
    ckpt, attention_only = checkpointed_blocks(mode, args.vision.depth, args.text.num_hidden_layers)
    spec = ActivationSpec(
        args, micro_batch(batch), compute_bytes=next(model.parameters()).dtype.itemsize, kernel="sdpa",
        trainable=Trainable.from_freeze(freeze or FreezeConfig()), checkpointed=ckpt,
        attention_recompute=attention_only, loss_chunk=8,
    )  # fmt: skip
    with checkpointing(model, mode):
        measured = measure_saved(TrainModule(model, 8), model, batch)
    return predict_activations(spec).saved, measured


def tiny_model(dtype, moe=None, freeze=None) -> Qwen3VL:
    torch.manual_seed(0)
    model = Qwen3VL(args_from_hf_dict(tiny_config_dict(moe=moe))).to(dtype)
    if freeze is not None:
        apply_freeze(model, freeze)
    return model


@pytest.mark.parametrize("kind", list(BATCHES))
@pytest.mark.parametrize("mode", ["none", "full"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_tiny_activations_are_exact(dtype, mode, kind):
    predicted, measured = predicted_vs_measured(tiny_model(dtype), BATCHES[kind](), mode)
    assert predicted == measured, (predicted, measured)


@pytest.mark.parametrize(
    "moe, freeze, mode",
    [
        (None, FreezeConfig(vision_encoder=True), "full"),
        (None, FreezeConfig(text_decoder=True), "none"),
        (None, FreezeConfig(vision_encoder=True, vision_projector=True), "selective"),
        ({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}, None, "none"),
        ({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}, None, "full"),
    ],
    ids=["frozen-vision-full", "frozen-decoder", "frozen-tower-selective", "moe", "moe-full"],
)
def test_tiny_activations_frozen_groups_and_moe(moe, freeze, mode):
    model = tiny_model(FP32, moe, freeze)
    for make in BATCHES.values():
        predicted, measured = predicted_vs_measured(model, make(), mode, freeze)
        assert predicted == measured, (predicted, measured)


def eight_b_widths_config() -> dict:
    """Qwen3-VL-8B widths (text 4096 / 32 heads / 8 kv heads / 12288, vision 1152 / 16 heads / 4304, the real
    vocabulary) with 2 decoder layers and 3 vision blocks."""
    cfg = tiny_config_dict(
        text_hidden=4096, text_layers=2, heads=32, kv_heads=8, head_dim=128, mrope_section=(24, 20, 20),
        vision_hidden=1152, vision_depth=3, vision_heads=16, deepstack=(1, 2), num_position_embeddings=2304,
    )  # fmt: skip
    cfg["text_config"]["intermediate_size"] = 12288
    cfg["vision_config"]["intermediate_size"] = 4304
    return cfg


@pytest.fixture(scope="module")
def mid_model():
    """Built on meta, allocated in bf16 on the CPU (3.6 GB), random init."""
    with torch.device("meta"):
        model = Qwen3VL(args_from_hf_dict(eight_b_widths_config())).to(BF16)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


MID_BATCHES = {
    "text": lambda: as_packed_batch(packed_row([build_sample([200], 1), build_sample([56], 2)])),
    "image": lambda: as_packed_batch(
        packed_row([build_sample([10, ("image", 16, 16), 20], 1), build_sample([40], 2)])
    ),
    "video": lambda: as_packed_batch(packed_row([build_sample([8, ("video", 4, 8, 8), 8], 3)])),
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "full"])
def test_mid_size_activations_are_exact(mid_model, mode):
    for kind, make in MID_BATCHES.items():
        predicted, measured = predicted_vs_measured(mid_model, make(), mode)
        assert predicted == measured, (kind, predicted, measured)
        assert measured > (10 if mode == "none" else 4) * 2**20  # real sizes: MiBs, not bytes
