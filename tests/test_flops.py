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
from vlmtune.train.config import TrainConfig
from vlmtune.train.flops import (
    PEAK_TFLOPS,
    Trainable,
    active_decoder_params,
    flops_per_token,
    model_flops,
    peak_tflops_for,
    recompute_flops,
    table_key,
)
from vlmtune.train.lora import LoraSetup

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
# A vision block's matmul weights (biases are additions, not counted): q, k, v, proj 4 x 1152^2 = 5,308,416;
# fc1 + fc2 2 x 1152 x 4304 = 9,916,416; together 15,224,832; x 27 = 411,070,464. Patch embedding 1536 x 1152.
VISION_BLOCKS = 411_070_464
PATCH_EMBED = 1_769_472
MERGER_FC1_8B, MERGER_FC2_8B = 4608 * 4608, 4608 * 4096
MERGER_8B = MERGER_FC1_8B + MERGER_FC2_8B  # 40,108,032 per merger, 4 mergers (main + 3 DeepStack)


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

    # Frozen vision encoder (the shipped 8B config): the tower runs forward only; the mergers train, their
    # LayerNorm too, so both their Linears pass a gradient down to it (6N); the decoder is unchanged.
    frozen = model_flops(args, lengths, grid, label_tokens=44, trainable=Trainable(vision_encoder=False))
    assert frozen.vision == (2 * VISION_BLOCKS + 2 * PATCH_EMBED) * 1024
    assert frozen.vision_attention == 4 * 27 * 1152 * 1024 * 1024
    assert frozen.projector == 6 * 4 * MERGER_8B * 256
    assert frozen.decoder == f.decoder
    # A frozen decoder still back-propagates to the vision side: 4 FLOPs per weight and token.
    text_frozen = model_flops(args, lengths, grid, trainable=Trainable(text_decoder=False))
    assert text_frozen.decoder == 4 * DENSE_DECODER_8B * 300


def placed_lora(model_cfg: dict, **lora):
    """The run's LoRA description as the trainer makes it: adapters placed on the meta-built model."""
    cfg = TrainConfig()
    for key, value in lora.items():
        setattr(cfg.lora, key, value)
    args = args_from_hf_dict(copy.deepcopy(model_cfg))
    setup = LoraSetup(cfg, args, seed=0, master_dtype=torch.float32, compute_dtype=torch.bfloat16)
    return args, setup.spec


# Rank 16 on every decoder Linear (all-linear): q 16 x (4096 + 4096) + k, v 16 x (4096 + 1024) + o 16 x
# (4096 + 4096) + gate, up 16 x (4096 + 12288) + down 16 x (12288 + 4096) = 1,212,416 per layer, x 36.
LORA_DECODER_8B = 43_646_976
# On the mergers: fc1 16 x (4608 + 4608) + fc2 16 x (4608 + 4096) = 286,720 per merger, 4 mergers.
LORA_MERGERS_8B = 1_146_880
# On the vision blocks: q 16 x (1152 + 1152) with k, v sharing q's A (B only: 16 x 1152 each), proj
# 16 x 2304, fc1, fc2 16 x (1152 + 4304) each = 285,184 per block, x 27.
LORA_VISION_8B = 7_699_968


def test_lora_flops_by_hand():
    args, lora = placed_lora(QWEN3_VL_8B, rank=16, vision_projector=True)
    assert lora.adapter_params == {"decoder": LORA_DECODER_8B, "experts": 0, "vision": 0,
                                   "projector": LORA_MERGERS_8B, "lm_head": 0}  # fmt: skip
    assert not any(lora.saved_params.values())
    grid, lengths = [(1, 32, 32)], [300]  # 1024 patches, 256 merged tokens
    f = model_flops(args, lengths, grid, label_tokens=44, lora=lora)
    assert f.decoder == 4 * DENSE_DECODER_8B * 300  # frozen base: forward + input gradient
    assert f.lm_head == 4 * LM_HEAD_8B * 44
    # No adapter in the tower: it runs forward only. In the frozen mergers fc1's input needs no gradient
    # (2N), fc2's does (4N): fc1's adapter trains.
    assert f.vision == (2 * VISION_BLOCKS + 2 * PATCH_EMBED) * 1024
    assert f.vision_attention == 4 * 27 * 1152 * 1024 * 1024
    assert f.projector == 4 * (2 * MERGER_FC1_8B + 4 * MERGER_FC2_8B) * 256
    # Decoder adapters: 6 per parameter and token. Merger adapters: fc1's A [16, 4608] forward and weight
    # gradient only (4), its B [4608, 16] and fc2's A, B all three (6).
    mergers = 4 * 16 * (4 * 4608 + 6 * 4608 + 6 * 4608 + 6 * 4096)
    assert mergers == 6 * LORA_MERGERS_8B - 4 * 2 * 16 * 4608
    assert f.lora == 6 * LORA_DECODER_8B * 300 + mergers * 256

    # Adapters in the vision blocks: the gradient starts at block 0's q/k/v adapters, so block 0's q, k, v
    # (and their shared A) need no input gradient; everything after back-propagates (4N, attention x3). The
    # patch embedding runs forward only; the DeepStack mergers pass the gradient down (4N), the merger trained
    # whole also computes its weight gradient (6N).
    args, lora = placed_lora(QWEN3_VL_8B, rank=16, vision_encoder=True, modules_to_save=["merger"])
    assert (lora.adapter_params["vision"], lora.saved_params["projector"]) == (LORA_VISION_8B, MERGER_8B)
    assert lora.saved == ("visual.merger",)
    f = model_flops(args, lengths, grid, label_tokens=44, lora=lora)
    qkv = 3 * 1152 * 1152
    assert f.vision == (4 * VISION_BLOCKS - 2 * qkv + 2 * PATCH_EMBED) * 1024
    assert f.vision_attention == 12 * 27 * 1152 * 1024 * 1024
    assert f.projector == (3 * 4 + 6) * MERGER_8B * 256
    # Per block: q, k, v each run the shared A [16, 1152] and their own B [1152, 16]; proj, fc1, fc2 their
    # A and B; 6 per parameter and patch, but 4 for block 0's A (no input gradient).
    block = 16 * (3 * (6 * 1152 + 6 * 1152) + 6 * 2 * 1152 + 6 * (1152 + 4304) * 2)
    assert block == 1_932_288  # more than 6 x 285,184: the shared A runs three times
    vision = 27 * block - 3 * 2 * 16 * 1152
    assert f.lora == 6 * LORA_DECODER_8B * 300 + vision * 1024


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


def test_30b_a3b_lora_flops_by_hand():
    """The shipped configs/qwen3vl_30b_a3b_lora.yaml adapters (rank 8 on attention and every expert) plus
    the router: an expert adapter counts for the top_k / num_experts share of tokens that visit it."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "router"]
    args, lora = placed_lora(QWEN3_VL_30B_A3B, rank=8, targets=targets)
    # Per layer: q 8 x (2048 + 4096) + k, v 8 x (2048 + 512) + o 8 x (4096 + 2048) = 139,264; router
    # 8 x (2048 + 128) = 17,408. Experts: gate_up 128 x 8 x (2048 + 1536) + down 128 x 8 x (768 + 2048)
    # = 6,553,600. x 48 layers.
    attention, router, experts = 48 * 139_264, 48 * 17_408, 48 * 6_553_600
    assert (attention, experts) == (6_684_672, 314_572_800)  # docs/lora.md: 6.7 M and 314.6 M at rank 8
    assert lora.adapter_params == {"decoder": attention + router, "experts": experts, "vision": 0, "projector": 0,
                             "lm_head": 0}  # fmt: skip
    n = 8192
    f = model_flops(args, [n], lora=lora)
    assert f.decoder == 4 * ACTIVE_DECODER_30B * n
    assert f.lm_head == 4 * LM_HEAD_30B * n
    assert f.lora == 6 * (attention + router) * n + 6 * experts * n * 8 / 128
