"""`model_flops` (train/flops.py) against torch's FlopCounterMode on tiny fp32 models, one forward and backward
of the training loss: full fine-tuning, frozen groups, MoE, and LoRA runs as the trainer places them
(adapters in the decoder, the vision blocks, the mergers, the experts and the router; dropout; a merger
trained whole). Matmuls only: FlopCounterMode also counts the attention kernels over the whole packed row
(its mask hides most of it), so `model_flops`' attention terms are left out of the comparison."""

from __future__ import annotations

import pytest
from torch.utils.flop_counter import FlopCounterMode

from test_plan import BATCHES, FP32, micro_batch, tiny_model
from test_plan_lora import ACTIVATION_RUNS, MOE, lora_model
from vlmtune.models.qwen3_vl.moe import Experts
from vlmtune.train.config import FreezeConfig
from vlmtune.train.flops import Trainable, model_flops
from vlmtune.train.loss import count_labels, step_normalizers, token_weights
from vlmtune.train.step import TrainModule

MATMULS = ("aten.mm", "aten.addmm", "aten.bmm")


def counted_matmul_flops(model, batch) -> int:
    """Matmul FLOPs of the loss's forward and backward, less the chunked loss's recomputed logits."""
    for module in model.modules():
        if isinstance(module, Experts):
            module.use_grouped_mm = False  # FlopCounterMode has no formula for the grouped GEMM
    counts = count_labels(batch)
    weights = token_weights(batch, counts, step_normalizers([counts]), "token_mean")
    with FlopCounterMode(display=False) as counter:
        TrainModule(model, 8)(batch, weights).backward()
    total = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in MATMULS)
    t = model.args.text
    return total - 2 * t.hidden_size * t.vocab_size * counts.tokens  # each chunk's logits, once more


def predicted_matmul_flops(model, batch, **kwargs) -> float:
    mb = micro_batch(batch)
    m = model.args.vision.spatial_merge_size
    # A text-only micro-batch runs the tower on a 1 x m x m dummy grid (TrainModule): it runs, so count it.
    f = model_flops(model.args, mb.sample_lengths, mb.grids or [(1, m, m)], label_tokens=mb.labels, **kwargs)
    return f.total - f.decoder_attention - f.vision_attention


@pytest.mark.parametrize(
    "moe, freeze",
    [
        (None, FreezeConfig()),
        (None, FreezeConfig(vision_encoder=True)),
        (None, FreezeConfig(text_decoder=True)),
        (None, FreezeConfig(vision_encoder=True, vision_projector=True)),
        (MOE, FreezeConfig()),
    ],
    ids=["full", "frozen-vision", "frozen-decoder", "frozen-tower", "moe"],
)
def test_flops_equal_flop_counter(moe, freeze):
    model = tiny_model(FP32, moe, freeze)
    for kind, make in BATCHES.items():
        batch = make()
        predicted = predicted_matmul_flops(model, batch, trainable=Trainable.from_freeze(freeze))
        assert counted_matmul_flops(model, batch) == predicted, kind


# The LoRA runs of the activation tests that change which matmuls run (QLoRA and dropout only change bytes).
LORA_RUNS = {
    name: ACTIVATION_RUNS[name]
    for name in ("decoder", "every-group", "mergers-only", "vision-fc2-dropout", "merger-trained-whole",
                 "moe-experts-router")
}  # fmt: skip


@pytest.mark.parametrize("run", list(LORA_RUNS))
def test_lora_flops_equal_flop_counter(run):
    lora, moe = LORA_RUNS[run]
    model, setup = lora_model(FP32, lora, moe)
    for kind, make in BATCHES.items():
        batch = make()
        predicted = predicted_matmul_flops(model, batch, lora=setup.spec)
        assert counted_matmul_flops(model, batch) == predicted, kind
