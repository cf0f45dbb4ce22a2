"""LoRA runs' checkpoints outside training: PEFT adapter export, merged HF export, and adapters on a loaded
model (`load_pretrained(path, adapter=DIR)`, `vlmtune chat/eval --adapter DIR`).

A LoRA training checkpoint holds only the adapters and the `modules_to_save` (meta.json's `config` records
the `lora:` section and the base checkpoint, `model.init_from_hf`).
"""

from __future__ import annotations

import os

import torch

from vlmtune.errors import CheckpointError
from vlmtune.models.qwen3_vl import Qwen3VL, build_model, load_config
from vlmtune.models.qwen3_vl.lora import LoraSpec, add_adapters, is_adapter, merge_adapters, modules_named

from .dcp import assets_dir, model_tensors, read_meta, resolve
from .hf import load_pretrained, save_pretrained
from .peft import (
    peft_config,
    to_peft_items,
    write_adapter,
)


def lora_section(path: str) -> dict | None:
    """The `lora:` section of the run a checkpoint step directory belongs to, or None for full fine-tuning."""
    meta = read_meta(path)
    section = meta.get("config", {}).get("lora") or {}
    return (
        {**section, "init_from_hf": meta["config"]["model"]["init_from_hf"]} if section.get("rank") else None
    )


def _spec(section: dict) -> LoraSpec:
    return LoraSpec(section["rank"], float(section["alpha"]), section["dropout"], section["use_rslora"])


def export_adapter(ckpt: str, out_dir: str) -> str:
    """A LoRA checkpoint -> `out_dir/adapter_config.json` + `adapter_model.safetensors` (PEFT format)."""
    path = resolve(os.fspath(ckpt))
    section = lora_section(path)
    if section is None:
        raise CheckpointError(
            f"{path}: not a LoRA run (lora.rank is 0); `vlmtune export` writes a full model"
        )
    args = load_config(assets_dir(path))
    props, get = model_tensors(path)
    names = list(props)
    saved, _ = modules_named(build_model(args), section.get("modules_to_save") or [])
    adapters = [n for n in names if is_adapter(n)]
    config = peft_config(_spec(section), adapters, saved, section["init_from_hf"], args.is_moe)
    return write_adapter(out_dir, to_peft_items(names, get, args), config)


def export_merged(ckpt: str, out_dir: str, base: str | None = None) -> str:
    """A LoRA checkpoint merged into its base model (`W + scale * B A`) -> a full Hugging Face checkpoint."""
    path = resolve(os.fspath(ckpt))
    model = load_merged(path, base)
    save_pretrained(model, out_dir, source_dir=assets_dir(path))
    return out_dir


def load_merged(ckpt: str, base: str | None = None) -> Qwen3VL:
    """The base model of a LoRA checkpoint with its adapters (and `modules_to_save`) merged in, on the CPU in
    the base checkpoint's dtype (merged in fp32)."""
    path = resolve(os.fspath(ckpt))
    section = lora_section(path)
    if section is None:
        raise CheckpointError(f"{path}: not a LoRA run; --merge applies to LoRA checkpoints only")
    base = base or section["init_from_hf"]
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise CheckpointError(f"{path}: its base model {base!r} is gone; pass --base DIR (the HF checkpoint)")
    model = load_pretrained(base)
    props, get = model_tensors(path)
    names = list(props)
    adapters = [n for n in names if is_adapter(n)]
    linears = sorted({n.rsplit(".lora_", 1)[0] for n in adapters if ".lora_" in n})
    add_adapters(model, linears, _expert_targets(adapters), _spec(section), torch.float32)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name in names:
            if name not in params:
                raise CheckpointError(
                    f"{path}: '{name}' is no parameter of the base model with these adapters"
                )
            params[name].copy_(get(name))
    merge_adapters(model)
    model.source_dir = assets_dir(path)
    return model


def _expert_targets(adapters: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in adapters:
        if n.endswith("_lora_A"):
            module, _, leaf = n.rpartition(".")
            out.setdefault(module, []).append(leaf[: -len("_lora_A")])
    return {m: [p for p in ("gate_up_proj", "down_proj") if p in v] for m, v in out.items()}
