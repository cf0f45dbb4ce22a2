"""PEFT adapter format: `adapter_config.json` + `adapter_model.safetensors`, exactly as `peft` 0.21 writes them
for transformers 5's `Qwen3VLForConditionalGeneration` / `Qwen3VLMoeForConditionalGeneration`.

Keys are `base_model.model.<transformers module>.lora_{A,B}.weight` (transformers names are ours with `model.`
in front; `lm_head` is the same), and modules trained whole (`modules_to_save`) are saved under their plain
checkpoint names behind the same prefix. Three things differ from our parameters:
- vision attention: transformers fuses q/k/v into `attn.qkv`, whose adapter is one `lora_A [r, D]` (our
  q_proj's, shared by k/v) and one `lora_B [3D, r]` (our three `lora_B`s stacked);
- MoE experts are fused nn.Parameters in transformers, which peft adapts through `target_parameters`: one
  `lora_A [E*r, in]` (expert e's rows e*r..e*r+r-1) and one `lora_B [out, r*E]` (expert e's columns e, e+E,
  ...) per projection. Two adapted projections of one experts module are nested wrappers: gate_up_proj is
  wrapped first, so its keys carry one more `base_layer.` than down_proj's;
- the router (`mlp.gate`) is not an nn.Linear in transformers 5: peft adapts its `weight` parameter, again
  through `target_parameters`.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmtune.errors import CheckpointError
from vlmtune.models.qwen3_vl import ModelArgs
from vlmtune.models.qwen3_vl.lora import LoraSpec, add_adapters, is_adapter, kind_of
from vlmtune.models.qwen3_vl.state_dict_adapter import (
    hf_to_native_name,
    tensors_from_hf,
    to_hf_items,
)

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")  # peft's wrapping order (transformers' parameter order)
_LINEAR_ADAPTER = re.compile(r"^(.*)\.lora_([AB])\.weight$")
_EXPERT_ADAPTER = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)_lora_([AB])$")
_PEFT_KEY = re.compile(r"^(.*?)((?:\.base_layer)*)\.lora_([AB])(?:\.default)?\.weight$")
_VISION_QKV = re.compile(r"^(visual\.blocks\.\d+\.attn)\.(q_proj|k_proj|v_proj)$")
UNSUPPORTED = {  # adapter_config.json keys whose non-default values we cannot reproduce
    "use_dora": False, "bias": "none", "lora_bias": False, "fan_in_fan_out": False, "layers_to_transform": None,
    "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "trainable_token_indices": None,
}  # fmt: skip


def _hf_module(native: str) -> str:
    """Our module name -> transformers' (the same rule as parameter names)."""
    return native if native == "lm_head" or native.startswith("lm_head.") else "model." + native


def _native_module(hf: str) -> str:
    if hf == "lm_head" or hf.startswith("lm_head."):
        return hf
    if not hf.startswith("model."):
        raise CheckpointError(f"adapter module '{hf}' is not part of a Qwen3-VL model")
    return hf[len("model.") :]


def expert_projections(names) -> dict[str, list[str]]:
    """{experts module: its adapted projections in peft's wrapping order} from native parameter names."""
    out: dict[str, list[str]] = {}
    for n in names:
        m = _EXPERT_ADAPTER.match(n)
        if m and m.group(3) == "A":
            out.setdefault(m.group(1), []).append(m.group(2))
    return {k: [p for p in EXPERT_PROJECTIONS if p in v] for k, v in out.items()}


def _nesting(projections: list[str], proj: str) -> str:
    return ".base_layer" * (len(projections) - 1 - projections.index(proj))


def to_peft_items(names: list[str], get, args: ModelArgs):
    """Native adapter / `modules_to_save` tensors (fetched one at a time by `get(name)`) -> (peft key, tensor)."""
    experts = expert_projections(names)
    saved = [n for n in names if not (_LINEAR_ADAPTER.match(n) or _EXPERT_ADAPTER.match(n))]
    for name in names:
        linear, expert = _LINEAR_ADAPTER.match(name), _EXPERT_ADAPTER.match(name)
        if linear:
            module, ab = linear.groups()
            qkv = _VISION_QKV.match(module)
            if qkv and ab == "A":
                yield f"{PREFIX}model.{qkv.group(1)}.qkv.lora_A.weight", get(name)
            elif qkv and qkv.group(2) == "q_proj":
                parts = [get(f"{qkv.group(1)}.{p}.lora_B.weight") for p in ("q_proj", "k_proj", "v_proj")]
                yield f"{PREFIX}model.{qkv.group(1)}.qkv.lora_B.weight", torch.cat(parts)
            elif not qkv:
                yield f"{PREFIX}{_hf_module(module)}.lora_{ab}.weight", get(name)
        elif expert:
            module, proj, ab = expert.groups()
            t = get(name)
            # A [E, in, r] -> [E*r, in]; B [E, r, out] -> [out, r*E] (expert e in columns e, e+E, ...)
            t = (
                t.transpose(1, 2).reshape(-1, t.shape[1])
                if ab == "A"
                else t.permute(2, 1, 0).reshape(t.shape[2], -1)
            )
            yield (
                f"{PREFIX}{_hf_module(module)}{_nesting(experts[module], proj)}.lora_{ab}.weight",
                t.contiguous(),
            )
    for hf_name, t in to_hf_items(saved, get, args):
        yield PREFIX + hf_name, t


def peft_config(
    spec: LoraSpec, adapter_names: list[str], saved_modules: list[str], base: str | None, is_moe: bool
) -> dict:
    """adapter_config.json for these native adapter parameters: exact transformers module names in
    `target_modules` (as peft writes after expanding `all-linear`), expert and router parameters in
    `target_parameters`."""
    modules, params = set(), set()
    for n in adapter_names:
        linear, expert = _LINEAR_ADAPTER.match(n), _EXPERT_ADAPTER.match(n)
        if expert:
            params.add(f"{_hf_module(expert.group(1))}.{expert.group(2)}")
        elif linear:
            module = linear.group(1)
            found = kind_of(module)
            if found and found[1] == "router":
                params.add(f"{_hf_module(module)}.weight")
            else:
                qkv = _VISION_QKV.match(module)
                modules.add(f"model.{qkv.group(1)}.qkv" if qkv else _hf_module(module))
    return {
        "peft_type": "LORA", "task_type": None, "r": spec.rank, "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout, "use_rslora": spec.use_rslora, "init_lora_weights": True,
        "target_modules": sorted(modules) or None, "target_parameters": sorted(params) or None,
        "modules_to_save": [_hf_module(m) for m in saved_modules] or None, "base_model_name_or_path": base,
        "inference_mode": True, **UNSUPPORTED,
        "auto_mapping": {"base_model_class": "Qwen3VLMoeForConditionalGeneration" if is_moe
                         else "Qwen3VLForConditionalGeneration"},
    }  # fmt: skip


def write_adapter(out_dir: str, items, config: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in items}
    save_file(tensors, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def read_adapter(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, {key: tensor}) of a PEFT LoRA adapter directory, with what we cannot load refused."""
    cfg_file = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"{path}: no {CONFIG}; expected a PEFT LoRA adapter directory")
    with open(cfg_file) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters load")
    for key, default in UNSUPPORTED.items():
        if cfg.get(key, default) not in (default, None, {}, False):
            raise CheckpointError(f"{cfg_file}: {key}={cfg[key]!r} is not supported (only plain LoRA loads)")
    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        raise CheckpointError(
            f"{path}: no {WEIGHTS} (adapter_model.bin is not read: convert it to safetensors)"
        )
    with safe_open(weights, framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return cfg, tensors


def spec_of(cfg: dict) -> LoraSpec:
    return LoraSpec(
        rank=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", 8)), dropout=float(cfg.get("lora_dropout") or 0.0),
        use_rslora=bool(cfg.get("use_rslora", False)),
    )  # fmt: skip


def native_targets(cfg: dict, tensors: dict) -> tuple[list[str], dict[str, list[str]]]:
    """(Linear modules, {experts module: projections}) in our names, from an adapter's keys."""
    linears, experts, params = [], {}, set(cfg.get("target_parameters") or [])
    for key in tensors:
        m = _PEFT_KEY.match(key)
        if not key.startswith(PREFIX):
            raise CheckpointError(f"adapter tensor '{key}' does not start with '{PREFIX}'")
        if not m or m.group(3) != "A":
            continue
        module = _native_module(m.group(1)[len(PREFIX) :])
        if module.endswith(".mlp.experts"):
            hf = m.group(1)[len(PREFIX) :]
            experts[module] = [p for p in EXPERT_PROJECTIONS if any(_matches(f"{hf}.{p}", t) for t in params)]
        elif module.endswith(".attn.qkv"):
            linears += [module[: -len("qkv")] + p for p in ("q_proj", "k_proj", "v_proj")]
        else:
            linears.append(module)
    return sorted(set(linears)), experts


def _matches(key: str, target: str) -> bool:
    return key == target or key.endswith("." + target)


def from_peft_tensors(
    tensors: dict, experts: dict[str, list[str]], args: ModelArgs
) -> dict[str, torch.Tensor]:
    """PEFT keys -> our parameter names and layouts (adapters and `modules_to_save`)."""
    out, ctx = {}, {"checkpoint_dir": "adapter", "moe_layout": ("transformers5", "a PEFT adapter")}
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:  # a module trained whole
            name = hf_to_native_name(key[len(PREFIX) :])
            if name is None:
                raise CheckpointError(f"adapter tensor '{key}' is not a Qwen3-VL weight")
            out.update(tensors_from_hf(name, t, args, ctx))
            continue
        hf, nesting, ab = m.groups()
        module = _native_module(hf[len(PREFIX) :])
        if module.endswith(".mlp.experts"):
            projs = experts[module]
            proj = projs[len(projs) - 1 - nesting.count(".base_layer")]
            e = args.text.num_experts
            t = (
                t.view(e, -1, t.shape[1]).transpose(1, 2)
                if ab == "A"
                else t.view(t.shape[0], -1, e).permute(2, 1, 0)
            )
            out[f"{module}.{proj}_lora_{ab}"] = t.contiguous()
        elif module.endswith(".attn.qkv"):
            base = module[: -len("qkv")]
            if ab == "A":
                out[f"{base}q_proj.lora_A.weight"] = t
            else:
                for p, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3)):
                    out[f"{base}{p}.lora_B.weight"] = part.contiguous()
        else:
            out[f"{module}.lora_{ab}.weight"] = t
    return out


@torch.no_grad()
def load_adapter(model, adapter_dir: str):
    """Put a PEFT LoRA adapter (ours or another tool's) on a loaded model, in place (adapters in the model's
    dtype, `modules_to_save` weights replaced)."""
    cfg, tensors = read_adapter(os.fspath(adapter_dir))
    linears, experts = native_targets(cfg, tensors)
    values = from_peft_tensors(tensors, experts, model.args)
    modules = dict(model.named_modules())
    missing = [n for n in [*linears, *experts] if n not in modules]
    if missing:
        raise CheckpointError(f"{adapter_dir}: adapts modules this model does not have: {missing[:5]}")
    add_adapters(model, linears, experts, spec_of(cfg), model.lm_head.weight.dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(values) - set(params))
    untouched = sorted(n for n in params if is_adapter(n) and n not in values)
    if unknown or untouched:
        raise CheckpointError(f"{adapter_dir}: tensors not in the model {unknown[:5]}, adapters without weights {untouched[:5]}")  # fmt: skip
    for name, value in values.items():
        params[name].copy_(value.to(params[name].dtype))
    return model
