"""LoRA without training runs: our PEFT export has exactly the keys and shapes peft writes and loads into
transformers + peft with the same logits (dense and MoE: vision qkv, mergers, experts, router,
modules_to_save); an adapter made by peft itself loads into vlmtune; merging equals the adapters; the
`lora:` section's validation; QLoRA's NF4 forward against its dequantized reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

from vlmtune.checkpoint import load_pretrained
from vlmtune.checkpoint.peft import WEIGHTS, peft_config, to_peft_items, write_adapter
from vlmtune.errors import ConfigError
from vlmtune.models.qwen3_vl.lora import (
    GROUPS,
    KINDS,
    LoRALinear,
    LoraSpec,
    add_adapters,
    is_adapter,
    merge_adapters,
    select_targets,
)
from vlmtune.testing import make_tiny_checkpoint
from vlmtune.train.config import from_dict
from vlmtune.train.qlora import quantize_decoder

from model_inputs import build_sample, hf_kwargs, ours_kwargs

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1)
SAVED = "visual.deepstack_merger_list.0"  # trained whole (modules_to_save) in the export tests


@pytest.fixture(scope="module", params=["dense", "moe"])
def ckpt(request, tmp_path_factory):
    d = str(tmp_path_factory.mktemp(request.param))
    kw = {"moe": MOE} if request.param == "moe" else {}
    make_tiny_checkpoint(d, seed=0, text_layers=2, vision_depth=2, deepstack=(0,), assets=False, **kw)
    return request.param, d


def hf_model(path):
    extra = {"experts_implementation": "eager"}
    return AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager", **extra).eval()


def adapted(path, kind: str, spec: LoraSpec):
    """Our model with adapters on every kind in every group (the router too for MoE), random non-zero A/B,
    and the first DeepStack merger changed as a module trained whole."""
    model = load_pretrained(path)
    kinds = KINDS if kind == "moe" else tuple(k for k in KINDS if k != "router")
    add_adapters(model, *select_targets(model, kinds, GROUPS, exclude=(SAVED,)), spec, torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.startswith(SAVED):
                p.add_(0.01)
    return model


def export(model, out: str, spec: LoraSpec) -> str:
    state = dict(model.named_parameters())
    names = [n for n in state if is_adapter(n) or n.startswith(SAVED)]
    cfg = peft_config(spec, [n for n in names if is_adapter(n)], [SAVED], None, model.args.is_moe)
    return write_adapter(out, to_peft_items(names, lambda n: state[n].detach(), model.args), cfg)


def shapes(path) -> dict:
    with safe_open(f"{path}/{WEIGHTS}", framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def sample():
    return build_sample([5, ("image", 4, 4), 7, ("video", 2, 4, 4), 3], seed=2)


def test_export_has_peft_keys_and_loads_into_transformers_with_equal_logits(ckpt, tmp_path):
    kind, path = ckpt
    spec = LoraSpec(rank=4, alpha=8.0)
    ours = adapted(path, kind, spec)
    out = export(ours, str(tmp_path / "ours"), spec)
    # peft itself, same targets: every Linear it calls all-linear, experts and router as parameters.
    extra = {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]}
    reference = get_peft_model(
        hf_model(path),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["deepstack_merger_list.0"],
                   exclude_modules=r".*deepstack_merger_list\.0\..*", **(extra if kind == "moe" else {})),
    )  # fmt: skip
    reference.save_pretrained(str(tmp_path / "peft"))
    assert shapes(out) == shapes(tmp_path / "peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(hf_model(path), out).eval()
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
    s = sample()
    with torch.no_grad():
        ours_logits = ours(**ours_kwargs(s)).logits
        peft_logits = loaded(**hf_kwargs(s)).logits
        assert (ours_logits - peft_logits).abs().max() < 1e-5
        merge_adapters(ours)
        assert not any(isinstance(m, LoRALinear) for m in ours.modules())
        assert (ours(**ours_kwargs(s)).logits - peft_logits).abs().max() < 1e-5


def test_adapter_made_by_peft_loads_into_vlmtune(ckpt, tmp_path):
    kind, path = ckpt
    moe = {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]}
    targets = ["q_proj", "qkv"] if kind == "moe" else ["q_proj", "v_proj", "qkv", "linear_fc1", "down_proj"]
    peft_model = get_peft_model(
        hf_model(path),
        LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=targets, modules_to_save=["merger"],
                   **(moe if kind == "moe" else {})),
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():  # peft initialises B to zero: make every adapter and the saved merger count
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    ours = load_pretrained(path, adapter=str(tmp_path / "adapter"))
    s = sample()
    with torch.no_grad():
        diff = (ours(**ours_kwargs(s)).logits - peft_model.eval()(**hf_kwargs(s)).logits).abs().max()
    assert diff < 1e-5


def raw_config(tmp_path, **lora) -> dict:
    return {
        "output_dir": str(tmp_path),
        "model": {"init_from_hf": "x"},
        "data": {"dataset": "d.json"},
        "train": {"train_iters": 1},
        "logging": {"tensorboard": False},
        "lora": {"rank": 8, **lora},
    }


@pytest.mark.parametrize(
    "lora,extra,message",
    [
        ({"targets": ["q_proj", "qkvz"]}, {}, "lora.targets: unknown kind(s) ['qkvz']"),
        ({"dropout": 1.0}, {}, "lora.dropout"),
        ({"base_quant": "nf4"}, {"parallel": {"tp": 2}}, "lora.base_quant=nf4"),
        ({}, {"freeze": {"text_decoder": True}}, "freeze.text_decoder: true and lora.text_decoder: true"),
        ({"text_decoder": False}, {}, "leaves nothing to train"),
    ],
)
def test_config_errors_name_the_key(tmp_path, lora, extra, message):
    raw = {**raw_config(tmp_path, **lora), **extra}
    with pytest.raises(ConfigError) as e:
        from_dict(raw, check_paths=False)
    assert message in str(e.value)


def test_mindspeed_names_and_defaults_load(tmp_path):
    cfg = from_dict(
        raw_config(tmp_path, alpha=32, dropout=0.05, targets=["q_proj", "o_proj"]), check_paths=False
    )
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (
        8,
        32.0,
        0.05,
        ["q_proj", "o_proj"],
    )
    assert from_dict({**raw_config(tmp_path), "lora": {}}, check_paths=False).lora.rank == 0  # off by default


def test_model_checks_refuse_split_experts_and_dropout(tmp_path):
    from vlmtune.models.qwen3_vl import args_from_hf_dict
    from vlmtune.testing import tiny_config_dict
    from vlmtune.train.lora import check_lora_model

    args = args_from_hf_dict(tiny_config_dict(moe=MOE))
    cfg = from_dict(raw_config(tmp_path, targets=["gate_proj"]), check_paths=False)
    with pytest.raises(ConfigError, match="fuse gate_proj and up_proj"):
        check_lora_model(cfg, args)
    cfg = from_dict(raw_config(tmp_path, dropout=0.1), check_paths=False)
    with pytest.raises(ConfigError, match="lora.dropout: must be 0 with expert or router targets"):
        check_lora_model(cfg, args)
    dense = args_from_hf_dict(tiny_config_dict())
    cfg = from_dict(raw_config(tmp_path, targets=["router"]), check_paths=False)
    with pytest.raises(ConfigError, match="select no module"):
        check_lora_model(cfg, dense)
    tied = args_from_hf_dict(tiny_config_dict(tie_word_embeddings=True))
    cfg = from_dict(raw_config(tmp_path, modules_to_save=["lm_head"]), check_paths=False)
    with pytest.raises(ConfigError, match="lm_head is tied to embed_tokens"):
        check_lora_model(cfg, tied)
    cfg = from_dict(raw_config(tmp_path, modules_to_save=["vision_tower"]), check_paths=False)
    with pytest.raises(ConfigError, match=r"\['vision_tower'\] name no module"):
        check_lora_model(cfg, dense)


def test_qlora_forward_equals_the_dequantized_reference(tmp_path):
    from torchao.quantization import NF4Tensor

    path = str(tmp_path / "ckpt")
    make_tiny_checkpoint(
        path, seed=0, text_hidden=64, text_layers=2, vision_depth=1, deepstack=(0,), assets=False
    )
    ours = adapted(path, "dense", LoraSpec(rank=4, alpha=8.0))
    assert len(quantize_decoder(ours)) == 2 * 7
    reference = adapted(path, "dense", LoraSpec(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if isinstance(p, NF4Tensor):
                reference.get_parameter(name).copy_(p.get_original_weight())
    s = sample()
    with torch.no_grad():
        diff = (ours(**ours_kwargs(s)).logits - reference(**ours_kwargs(s)).logits).abs().max()
    assert diff < 1e-5


def test_bf16_expert_adapters_of_rank_4_run_without_the_grouped_kernel(tmp_path):
    """Rank-4 bf16 adapters have 8-byte rows, which no grouped GEMM kernel takes: the experts fall back to the
    per-expert loop (the grouped result of rank 8 is checked against the loop too)."""
    from vlmtune.models.qwen3_vl.moe import grouped_mm_supported

    x = torch.zeros(6, 32, dtype=torch.bfloat16)
    for rank, grouped in ((4, False), (8, True)):
        a, b = torch.zeros(2, 32, rank, dtype=torch.bfloat16), torch.zeros(2, rank, 32, dtype=torch.bfloat16)
        assert grouped_mm_supported(x, a, b) is grouped
    make_tiny_checkpoint(
        str(tmp_path), seed=0, text_layers=2, vision_depth=1, deepstack=(0,), assets=False, moe=MOE
    )
    losses = {}
    for rank in (4, 8):
        model = load_pretrained(str(tmp_path), dtype=torch.bfloat16)
        add_adapters(
            model,
            *select_targets(model, ("gate_proj", "up_proj", "down_proj"), ("text_decoder",)),
            LoraSpec(rank, 8),
            torch.bfloat16,
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if is_adapter(name):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        out = model(**ours_kwargs(sample()))
        out.logits.float().square().mean().backward()
        grads = [p.grad for n, p in model.named_parameters() if is_adapter(n)]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        losses[rank] = out.logits.float()
    assert all(torch.isfinite(v).all() for v in losses.values())
