"""Checkpoint IO and config reading: round trips through transformers, config variants, clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmtune import load_pretrained, save_pretrained
from vlmtune.checkpoint.hf import checkpoint_files
from vlmtune.errors import CheckpointError, ConfigError
from vlmtune.models.qwen3_vl import args_from_hf_dict
from vlmtune.testing import make_tiny_checkpoint, tiny_config_dict

from model_inputs import build_sample, hf_kwargs, ours_kwargs

SAMPLE = [4, ("image", 4, 6), 3, ("video", 2, 2, 4), 5]


def hf_reload(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()


def assert_same_logits(ours, hf, seed=0):
    inputs = build_sample(SAMPLE, seed)
    with torch.no_grad():
        a = ours(**ours_kwargs(inputs)).logits
        b = hf(**hf_kwargs(inputs)).logits
    assert (a - b).abs().max().item() <= 1e-5


def test_round_trip_bitwise_through_transformers(tiny_ckpt, tmp_path):
    src, hf = tiny_ckpt
    ours = load_pretrained(src)
    out = tmp_path / "export"
    save_pretrained(ours, out)
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "chat_template.jinja"} <= files
    assert {"preprocessor_config.json", "video_preprocessor_config.json"} <= files
    saved = {}
    for f in checkpoint_files(str(out)):
        saved.update(load_file(f))
    source = {}
    for f in checkpoint_files(src):
        source.update(load_file(f))
    assert saved.keys() == source.keys()
    for k in source:
        assert saved[k].dtype == source[k].dtype and torch.equal(saved[k], source[k]), k
    reloaded = hf_reload(out)
    for k, v in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    assert_same_logits(ours, reloaded)


def test_sharded_save_and_load(tiny_ckpt, tmp_path):
    src, hf = tiny_ckpt
    ours = load_pretrained(src)
    save_pretrained(ours, tmp_path, max_shard_bytes=2 * 2**20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    again = load_pretrained(tmp_path)
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert_same_logits(again, hf_reload(tmp_path))


@pytest.mark.parametrize(
    "variant",
    [
        dict(tie_word_embeddings=True),
        dict(deepstack=(1, 2), vision_depth=4),
        dict(vision_hidden=48, vision_heads=3, text_hidden=64),
        dict(form="4.57"),
        dict(form="4.57", tie_word_embeddings=True, deepstack=(2,)),
    ],
    ids=["tied", "deepstack_not_leading", "vision_width_differs", "form_4_57", "form_4_57_tied"],
)
def test_config_variants_match_transformers(tmp_path, variant):
    hf = make_tiny_checkpoint(str(tmp_path), seed=3, assets=False, text_layers=3, **variant).eval()
    if variant.get("form") == "4.57":
        # rewrite the saved config.json in the 4.57 form (rope_scaling + rope_theta, tie in text_config)
        cfg = tiny_config_dict(**variant)
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = load_pretrained(tmp_path).eval()
    assert ours.args.tie_word_embeddings == variant.get("tie_word_embeddings", False)
    if ours.args.tie_word_embeddings:
        assert ours.lm_head.weight is ours.language_model.embed_tokens.weight
    assert_same_logits(ours, hf)
    save_pretrained(ours, tmp_path / "out")
    assert_same_logits(ours, hf_reload(tmp_path / "out"))


def test_load_in_bfloat16(tiny_ckpt):
    src, _ = tiny_ckpt
    model = load_pretrained(src, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model(**ours_kwargs(build_sample(SAMPLE, 1))).logits
    assert torch.isfinite(out.float()).all()


def test_config_errors_name_the_key():
    base = tiny_config_dict()
    bad = json.loads(json.dumps(base))
    del bad["text_config"]["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        args_from_hf_dict(bad)
    bad = json.loads(json.dumps(base))
    bad["text_config"]["rope_theta"] = 10000.0  # contradicts rope_parameters.rope_theta
    with pytest.raises(ConfigError, match="rope_theta"):
        args_from_hf_dict(bad)
    bad = json.loads(json.dumps(base))
    bad["text_config"]["rope_scaling"] = {"rope_type": "default", "mrope_section": [3, 3, 2]}
    with pytest.raises(ConfigError, match="mrope_section"):
        args_from_hf_dict(bad)
    bad = json.loads(json.dumps(base))
    bad["vision_config"]["out_hidden_size"] = 48
    with pytest.raises(ConfigError, match="out_hidden_size"):
        args_from_hf_dict(bad)
    bad = json.loads(json.dumps(base))
    bad["model_type"] = "llava"
    with pytest.raises(ConfigError, match="model_type"):
        args_from_hf_dict(bad)
    bad = json.loads(json.dumps(base))
    del bad["text_config"]["rope_parameters"]
    with pytest.raises(ConfigError, match="rope_theta"):
        args_from_hf_dict(bad)


def test_checkpoint_errors_name_the_tensor(tiny_ckpt, tmp_path):
    src, _ = tiny_ckpt
    for name in os.listdir(src):
        if name != "model.safetensors":
            os.symlink(os.path.join(src, name), tmp_path / name)
    (shard,) = checkpoint_files(src)
    tensors = load_file(shard)
    missing = dict(tensors)
    del missing["model.visual.merger.linear_fc2.bias"]
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="merger.linear_fc2.bias"):
        load_pretrained(tmp_path)
    extra = dict(tensors)
    extra["model.visual.unknown.weight"] = torch.zeros(2)
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unknown.weight"):
        load_pretrained(tmp_path)
    wrong = dict(tensors)
    wrong["model.language_model.norm.weight"] = torch.zeros(3)
    save_file(wrong, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="norm.weight.*shape"):
        load_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_pretrained(tmp_path / "nowhere")
