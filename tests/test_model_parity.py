"""Native dense Qwen3-VL vs transformers' Qwen3VLForConditionalGeneration (eager, fp32): logits, loss, grads."""

from __future__ import annotations

import pytest
import torch

from vlmtune import load_pretrained
from vlmtune.models.qwen3_vl import get_rope_index

from model_inputs import build_sample, hf_kwargs, ours_kwargs, pad_batch

CASES = {
    "text": [17],
    "image": [5, ("image", 4, 6), 7],
    "images_of_different_sizes": [3, ("image", 4, 6), 4, ("image", 8, 2), 2, ("image", 2, 2), 5],
    "video_two_frame_pairs": [4, ("video", 2, 4, 4), 6],
    "image_and_video": [3, ("image", 6, 4), 5, ("video", 3, 2, 4), 4],
}


@pytest.fixture(scope="module")
def pair(tiny_ckpt):
    path, hf = tiny_ckpt
    ours = load_pretrained(path).eval()
    return ours, hf.eval()


def max_abs(a, b):
    return (a - b).abs().max().item()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_loss_match_transformers(pair, case):
    ours, hf = pair
    inputs = build_sample(CASES[case], seed=1)
    labels = inputs["input_ids"].clone()
    labels[:, :3] = -100
    with torch.no_grad():
        ref = hf(**hf_kwargs(inputs), labels=labels)
        out = ours(**ours_kwargs(inputs), labels=labels)
    assert out.logits.shape == ref.logits.shape
    assert max_abs(out.logits, ref.logits) <= 1e-5
    assert abs(out.loss.item() - ref.loss.item()) / ref.loss.item() <= 1e-6


def test_position_ids_match_transformers(pair):
    ours, hf = pair
    inputs = pad_batch([build_sample(CASES["image_and_video"], 2), build_sample(CASES["image"], 3)], "left")
    ref, ref_delta = hf.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        inputs["image_grid_thw"],
        inputs["video_grid_thw"],
        inputs["attention_mask"],
    )
    pos, delta = get_rope_index(
        inputs["input_ids"],
        inputs["image_grid_thw"],
        inputs["video_grid_thw"],
        inputs["attention_mask"],
        image_token_id=151655,
        video_token_id=151656,
        spatial_merge_size=2,
    )
    assert torch.equal(pos, ref)
    assert torch.equal(delta.view(-1), ref_delta.view(-1))


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_transformers(pair, side):
    ours, hf = pair
    inputs = pad_batch([build_sample(CASES["image"], 4), build_sample([9], 5)], side)
    with torch.no_grad():
        ref = hf(**hf_kwargs(inputs)).logits
        out = ours(**ours_kwargs(inputs)).logits
    keep = inputs["attention_mask"].bool()
    assert max_abs(out[keep], ref[keep]) <= 1e-5
    # and each row equals that sample run alone (padding changes nothing at real tokens)
    alone = ours(**ours_kwargs(build_sample([9], 5))).logits[0]
    row = out[1][keep[1]]
    assert max_abs(row, alone) <= 1e-5


def test_gradients_match_transformers(pair):
    ours, hf = pair
    inputs = build_sample(CASES["image_and_video"], seed=6)
    labels = inputs["input_ids"].clone()
    ours.zero_grad()
    hf.zero_grad()
    ours(**ours_kwargs(inputs), labels=labels).loss.backward()
    hf(**hf_kwargs(inputs), labels=labels).loss.backward()
    ref = dict(hf.named_parameters())
    checked = {
        "language_model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
        "visual.patch_embed.proj.weight": "model.visual.patch_embed.proj.weight",
        "visual.blocks.1.attn.k_proj.weight": "model.visual.blocks.1.attn.qkv.weight",
        "visual.blocks.1.mlp.linear_fc1.weight": "model.visual.blocks.1.mlp.linear_fc1.weight",
        "visual.merger.linear_fc1.weight": "model.visual.merger.linear_fc1.weight",
        "visual.deepstack_merger_list.1.norm.weight": "model.visual.deepstack_merger_list.1.norm.weight",
        "visual.pos_embed.weight": "model.visual.pos_embed.weight",
        "language_model.layers.0.self_attn.q_proj.weight": "model.language_model.layers.0.self_attn.q_proj.weight",
        "language_model.layers.0.self_attn.k_norm.weight": "model.language_model.layers.0.self_attn.k_norm.weight",
        "language_model.layers.0.mlp.down_proj.weight": "model.language_model.layers.0.mlp.down_proj.weight",
        "lm_head.weight": "lm_head.weight",
    }
    params = dict(ours.named_parameters())
    for name, hf_name in checked.items():
        g, r = params[name].grad, ref[hf_name].grad
        assert g is not None and r is not None, name
        if hf_name.endswith("attn.qkv.weight"):
            r = r.chunk(3)[1]  # checkpoints fuse q/k/v; we hold k_proj alone
        assert rel(g.reshape(r.shape), r) <= 1e-4, name
    ours.zero_grad()
    hf.zero_grad()


def test_packed_row_equals_samples_alone(pair):
    ours, hf = pair
    samples = [
        build_sample([6, ("image", 4, 4), 3], 7),
        build_sample([11], 8),
        build_sample(CASES["video_two_frame_pairs"], 9),
    ]
    positions, lens = [], []
    for s in samples:
        pos, _ = get_rope_index(
            s["input_ids"],
            s["image_grid_thw"],
            s["video_grid_thw"],
            image_token_id=151655,
            video_token_id=151656,
        )
        positions.append(pos)
        lens.append(s["input_ids"].shape[1])
    packed = pad_batch(samples, "right")  # concatenates media in sample order
    packed_ids = torch.cat([s["input_ids"] for s in samples], 1)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        out = ours(
            packed_ids,
            pixel_values=packed["pixel_values"],
            image_grid_thw=packed["image_grid_thw"],
            pixel_values_videos=packed["pixel_values_videos"],
            video_grid_thw=packed["video_grid_thw"],
            position_ids=torch.cat(positions, dim=2),
            cu_seqlens=cu,
        ).logits[0]
        for i, s in enumerate(samples):
            alone = ours(**ours_kwargs(s)).logits[0]
            ref = hf(**hf_kwargs(s)).logits[0]
            part = out[cu[i] : cu[i + 1]]
            assert max_abs(part, alone) <= 1e-5
            assert max_abs(part, ref) <= 1e-5


def test_packed_loss_ignores_sample_boundaries(pair):
    ours, _ = pair
    a, b = build_sample([8], 10), build_sample([6], 11)
    ids = torch.cat([a["input_ids"], b["input_ids"]], 1)
    pos = torch.cat([torch.arange(8), torch.arange(6)]).view(1, 1, -1).expand(3, 1, -1)
    cu = torch.tensor([0, 8, 14], dtype=torch.int32)
    with torch.no_grad():
        packed = ours(ids, position_ids=pos, cu_seqlens=cu, labels=ids).loss
        la = ours(a["input_ids"], labels=a["input_ids"]).loss
        lb = ours(b["input_ids"], labels=b["input_ids"]).loss
    # token mean over 7 + 5 predicted tokens; the last token of sample a never predicts b's first
    expected = (la * 7 + lb * 5) / 12
    assert abs(packed.item() - expected.item()) <= 1e-5 * expected.item()


def test_mismatched_placeholders_raise(pair):
    ours, _ = pair
    inputs = build_sample([3, ("image", 4, 4), 3], 12)
    inputs["input_ids"][0, 5] = 7  # one image pad token fewer
    with pytest.raises(ValueError, match="image placeholder tokens"):
        ours(**ours_kwargs(inputs))
