"""Model FLOPs (train/flops.py) against hand computations for Qwen3-VL-8B and -30B-A3B; the peak table.

The config values below are the published Qwen3-VL-8B-Instruct / Qwen3-VL-30B-A3B-Instruct `config.json`
values (checked against what we know of them: 8B text 4096 hidden, 36 layers, 32/8 heads of 128, 12288
intermediate, 151936 vocab, untied; 30B-A3B text 2048 hidden, 48 layers, 32/4 heads of 128, 128 experts,
top-8, 768 expert intermediate; both vision towers 27 blocks of 1152 with 16 heads, 4304 intermediate,
patch 16, merge 2, temporal patch 2, DeepStack after blocks 8, 16, 24; the 8B totals 8.77B parameters).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from vlmtune.models.qwen3_vl import Qwen3VL, args_from_hf_dict
from vlmtune.testing import tiny_config_dict
from vlmtune.train.flops import (
    PEAK_TFLOPS,
    LoraSpec,
    Trainable,
    active_decoder_params,
    flops_per_token,
    model_flops,
    peak_tflops_for,
    recompute_flops,
    table_key,
)

VISION = {
    "depth": 27,
    "hidden_size": 1152,
    "hidden_act": "gelu_pytorch_tanh",
    "intermediate_size": 4304,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [8, 16, 24],
}
ROPE = {
    "rope_type": "default",
    "rope_theta": 5000000.0,
    "mrope_section": [24, 20, 20],
    "mrope_interleaved": True,
}

QWEN3_VL_8B = {
    "model_type": "qwen3_vl",
    "tie_word_embeddings": False,
    "text_config": {
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_parameters": ROPE,
    },
    "vision_config": {**VISION, "out_hidden_size": 4096},
}
QWEN3_VL_30B_A3B = {
    "model_type": "qwen3_vl_moe",
    "tie_word_embeddings": False,
    "text_config": {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "vocab_size": 151936,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rope_parameters": ROPE,
    },
    "vision_config": {**VISION, "out_hidden_size": 2048},
}


def meta_model(cfg: dict) -> Qwen3VL:
    with torch.device("meta"):
        return Qwen3VL(args_from_hf_dict(copy.deepcopy(cfg)))


def matmul_numel(module) -> int:
    """Weights of the module's matmuls (2-D and 3-D parameters), counted on the module itself."""
    return sum(p.numel() for p in module.parameters() if p.ndim >= 2)


# ------------------------------------------------------------------------------------------------- 8B

# Per decoder layer: q 4096x4096 + k 4096x1024 + v 4096x1024 + o 4096x4096 = 41,943,040;
# MLP 3 x 4096 x 12288 = 150,994,944; together 192,937,984; x 36 layers = 6,945,767,424.
DENSE_DECODER_8B = 6_945_767_424
LM_HEAD_8B = 4096 * 151936  # 622,329,856
# A vision block: q, k, v, proj 4 x (1152^2 + 1152) = 5,313,024; fc1 + fc2 2 x 1152 x 4304 + 4304 + 1152
# = 9,921,872; together 15,234,896; x 27 = 411,342,192. Patch embedding (1536 + 1) x 1152 = 1,770,624.
VISION_BLOCKS = 411_342_192
PATCH_EMBED = 1_770_624
MERGER_8B = 4608 * 4608 + 4608 + 4608 * 4096 + 4096  # 40,116,736 per merger, 4 mergers (main + 3 DeepStack)


def test_8b_parameter_counts_match_the_module():
    model = meta_model(QWEN3_VL_8B)
    args = model.args
    assert sum(active_decoder_params(args.text).values()) == DENSE_DECODER_8B
    assert matmul_numel(model.language_model.layers) == DENSE_DECODER_8B
    assert model.lm_head.weight.numel() == LM_HEAD_8B
    assert matmul_numel(model.visual.blocks) == 27 * 4 * 1152 * 1152 + 27 * 2 * 1152 * 4304
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(8.77e9, rel=2e-3)  # published size


def test_8b_text_flops_per_token_by_hand():
    args = meta_model(QWEN3_VL_8B).args
    n = 4096
    # 6 x (decoder + lm_head) = 6 x 7,568,097,280 = 45,408,583,680
    linear = 6 * (DENSE_DECODER_8B + LM_HEAD_8B)
    assert linear == 45_408_583_680
    # attention: 12 x 36 layers x 128 x 32 heads = 1,769,472 per (query, key) pair, n(n+1)/2 causal pairs
    attention = 1_769_472 * (n * (n + 1) // 2) / n  # 3,624,763,392 per token
    assert attention == 3_624_763_392
    assert flops_per_token(args, [n]) == pytest.approx(linear + attention, rel=1e-12)
    # Two packed samples of 2048 attend only within themselves: the attention term halves (almost).
    two = flops_per_token(args, [2048, 2048])
    assert two == pytest.approx(linear + 1_769_472 * 2 * (2048 * 2049 // 2) / n, rel=1e-12)


def test_8b_image_flops_by_hand():
    args = meta_model(QWEN3_VL_8B).args
    grid = [(1, 32, 32)]  # 1024 patches, 256 merged tokens, one attention segment of 1024
    lengths = [300]
    f = model_flops(args, lengths, grid, label_tokens=44)
    assert f.vision == (6 * VISION_BLOCKS + 4 * PATCH_EMBED) * 1024
    assert f.vision_attention == 12 * 27 * 1152 * 1024 * 1024
    assert f.projector == 6 * 4 * MERGER_8B * 256
    assert f.lm_head == 6 * LM_HEAD_8B * 44  # the chunked loss applies lm_head to label tokens only
    assert f.decoder == 6 * DENSE_DECODER_8B * 300
    # A video of 4 frame-pairs of 16 x 16 patches: four attention segments of 256 patches.
    video = model_flops(args, lengths, [(4, 16, 16)])
    assert video.vision_attention == 12 * 27 * 1152 * 4 * 256 * 256

    # Frozen vision encoder (the shipped 8B config): the tower runs forward only, the mergers train but
    # need no input gradient; the decoder is unchanged.
    frozen = model_flops(args, lengths, grid, label_tokens=44, trainable=Trainable(vision_encoder=False))
    assert frozen.vision == (2 * VISION_BLOCKS + 2 * PATCH_EMBED) * 1024
    assert frozen.vision_attention == 4 * 27 * 1152 * 1024 * 1024
    assert frozen.projector == 4 * 4 * MERGER_8B * 256
    assert frozen.decoder == f.decoder
    # A frozen decoder still back-propagates to the vision side: 4 FLOPs per weight and token.
    text_frozen = model_flops(args, lengths, grid, trainable=Trainable(text_decoder=False))
    assert text_frozen.decoder == 4 * DENSE_DECODER_8B * 300


def test_lora_flops_by_hand():
    args = meta_model(QWEN3_VL_8B).args
    lora = LoraSpec(rank=16, targets=["q_proj", "v_proj"])
    f = model_flops(args, [100], lora=lora)
    # adapters per layer: 16 x (4096 + 4096) + 16 x (4096 + 1024) = 212,992; x 36 = 7,667,712
    assert f.lora == 6 * 7_667_712 * 100
    assert f.decoder == 4 * DENSE_DECODER_8B * 100  # frozen base: forward + input gradient


# ------------------------------------------------------------------------------------------ 30B-A3B

# Per layer: attention q 2048x4096 + k 2048x512 + v 2048x512 + o 4096x2048 = 18,874,368; router 2048 x 128
# = 262,144; experts 128 x 3 x 2048 x 768 = 603,979,776, of which a token visits 8/128: 37,748,736.
# Active per layer 56,885,248; x 48 = 2,730,491,904. lm_head 2048 x 151936 = 311,164,928.
ACTIVE_DECODER_30B = 2_730_491_904
EXPERTS_30B_PER_LAYER = 603_979_776
LM_HEAD_30B = 311_164_928


def test_30b_a3b_counts_active_experts_only():
    model = meta_model(QWEN3_VL_30B_A3B)
    args = model.args
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert experts == 48 * EXPERTS_30B_PER_LAYER  # the module holds all 128 experts ...
    non_expert = matmul_numel(model.language_model.layers) - experts
    assert non_expert == 48 * (18_874_368 + 262_144)
    # ... the FLOPs count the top-8 of them.
    assert sum(active_decoder_params(args.text).values()) == ACTIVE_DECODER_30B
    assert non_expert + experts * 8 / 128 == ACTIVE_DECODER_30B
    n = 8192
    linear = 6 * (ACTIVE_DECODER_30B + LM_HEAD_30B)  # 6 x 3,041,656,832 = 18,249,940,992
    assert linear == 18_249_940_992
    attention = 12 * 48 * 128 * 32 * (n * (n + 1) // 2) / n
    assert flops_per_token(args, [n]) == pytest.approx(linear + attention, rel=1e-12)
    # Counting all 128 experts (today's metrics.py) gives 48 x 623,116,288 + 311,164,928 = 30,220,746,752
    # weights per token: the linear FLOPs overstated 9.94x (the "about 9x").
    assert non_expert + experts + LM_HEAD_30B == 30_220_746_752
    assert 30_220_746_752 / 3_041_656_832 == pytest.approx(9.9356, abs=1e-4)


def test_recompute_flops_is_one_forward_of_the_checkpointed_blocks():
    args = meta_model(QWEN3_VL_8B).args
    lengths, grids = [1000, 24], [(1, 8, 8)]
    layer = recompute_flops(args, lengths, grids, decoder_layers=1, vision_blocks=0)
    assert layer == 2 * DENSE_DECODER_8B / 36 * 1024 + 4 * 32 * 128 * (1000 * 1001 // 2 + 24 * 25 // 2)
    block = recompute_flops(args, lengths, grids, decoder_layers=0, vision_blocks=1)
    assert block == 2 * VISION_BLOCKS / 27 * 64 + 4 * 1152 * 64 * 64


# ------------------------------------------------------------------------------------------ GPU peaks


@pytest.mark.parametrize(
    "name, key",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200"),
        ("NVIDIA GH200 480GB", "H100 SXM"),
        ("NVIDIA H20", "H20"),
        ("NVIDIA H800", "H800"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100-PCIE-40GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA A800-SXM4-80GB", "A800"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("Tesla V100-SXM2-32GB", None),
        ("NVIDIA GeForce RTX 3090", None),
    ],
)
def test_peak_table_matches_device_names(name, key):
    assert table_key(name) == key
    assert peak_tflops_for(name) == (PEAK_TFLOPS[key] if key else None)


def test_configured_peak_overrides_the_table():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", configured=700.0) == 700.0
    assert peak_tflops_for("Some Future GPU", configured=1234.0) == 1234.0
    assert math.isclose(PEAK_TFLOPS["A100"], 312.0) and PEAK_TFLOPS["B200"] > PEAK_TFLOPS["H200"]


def test_micro_batch_flops_reads_the_packed_row():
    """The trainer's MFU counts a packed micro-batch by its samples' lengths, its grids and label tokens."""
    from vlmtune.train.metrics import micro_batch_flops

    from model_inputs import as_packed_batch, build_sample, packed_row

    batch = as_packed_batch(
        packed_row([build_sample([6, ("image", 4, 8), 3], 1), build_sample([4, ("video", 2, 4, 4), 2], 2)])
    )
    args = args_from_hf_dict(tiny_config_dict())
    cu = batch.cu_seqlens.tolist()
    want = model_flops(
        args,
        [b - a for a, b in zip(cu[:-1], cu[1:])],
        [[1, 4, 8], [2, 4, 4]],
        label_tokens=batch.num_label_tokens,
        trainable=Trainable(),
    ).total
    assert micro_batch_flops(args, batch, Trainable()) == want > 0
