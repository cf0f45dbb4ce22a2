"""Hugging Face checkpoint layout <-> our parameters: names, the tensors that differ, and MoE expert layouts.

Our parameter names are the transformers names without the `model.` prefix (`visual.*`, `language_model.*`);
`lm_head.weight` is the same. Two dense-model tensors differ from checkpoints: the patch embedding (a Linear
`[D, C*T*P*P]` here, a Conv3d `[D, C, T, P, P]` there) and the vision attention's fused `attn.qkv` (three
`q_proj/k_proj/v_proj` Linears here, so tensor parallelism can shard each by heads).

MoE experts: ours use the hub layout, `gate_up_proj [E, H, 2I]` and `down_proj [E, I, H]` (what real
checkpoints and transformers 4.57 store; the `x @ W[e]` operand of grouped GEMM). transformers 5.x holds and
saves the transpose (`[E, 2I, H]`, `[E, H, I]`); a shape that fits one layout decides, a square one is decided
by the facts config.json records (`transformers_version`, or our `vlmtune_expert_layout`).

Pure functions of tensors and `ModelArgs`: the model modules never import this file; the checkpoint code does.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterator

import torch

from vlmtune.errors import CheckpointError

from .config import ModelArgs

HUB, TRANSFORMERS5 = "hub", "transformers5"
LAYOUT_KEY = "vlmtune_expert_layout"  # written into config.json by our saves
_PATCH = "visual.patch_embed.proj.weight"
_QKV = re.compile(r"^(visual\.blocks\.\d+\.attn\.)(qkv|q_proj|k_proj|v_proj)\.(weight|bias)$")


def hf_to_native_name(hf_name: str) -> str | None:
    """Our name of a checkpoint tensor, or None for a tensor that is not a Qwen3-VL weight."""
    if hf_name.startswith("model."):
        return hf_name[len("model.") :]
    if hf_name == "lm_head.weight":
        return hf_name
    return None


def native_to_hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def tensors_from_hf(
    name: str, tensor: torch.Tensor, args: ModelArgs, ctx: dict
) -> list[tuple[str, torch.Tensor]]:
    """One checkpoint tensor (under our name) -> the native (name, tensor) pairs it holds.

    `ctx` carries facts across the tensors of one checkpoint (its directory, the recorded expert layout)."""
    if name == _PATCH:
        return [(name, tensor.reshape(tensor.shape[0], -1))]
    m = _QKV.match(name)
    if m and m.group(2) == "qkv":
        return [
            (f"{m.group(1)}{p}.{m.group(3)}", t)
            for p, t in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3))
        ]
    if args.is_moe and ".mlp.experts." in name:
        return [(name, expert_tensor_from_hf(name, tensor, args, ctx))]
    return [(name, tensor)]


def tensor_to_hf(name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Our parameter -> checkpoint layout (the layout of real hub checkpoints; experts are saved as they are)."""
    v = args.vision
    if name == _PATCH:
        return tensor.reshape(-1, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return tensor


def to_hf_items(
    names: list[str], get: Callable[[str], torch.Tensor], args: ModelArgs
) -> Iterator[tuple[str, torch.Tensor]]:
    """Native tensors (by `get(name)`, fetched one HF tensor at a time) -> (hf_name, tensor) in checkpoint
    layout: vision q/k/v fused into `attn.qkv`, the patch embedding as a Conv3d weight, the tied lm_head
    skipped (as transformers does)."""
    present = set(names)
    for name in names:
        if name == "lm_head.weight" and args.tie_word_embeddings:
            continue
        m = _QKV.match(name)
        if m:
            if m.group(2) != "q_proj":
                continue  # fused with q_proj below
            parts = [f"{m.group(1)}{p}.{m.group(3)}" for p in ("q_proj", "k_proj", "v_proj")]
            missing = [p for p in parts if p not in present]
            if missing:
                raise CheckpointError(f"cannot fuse {m.group(1)}qkv: {missing} missing")
            yield native_to_hf_name(f"{m.group(1)}qkv.{m.group(3)}"), torch.cat([get(p) for p in parts])
            continue
        yield native_to_hf_name(name), tensor_to_hf(name, get(name), args)


def saved_config(args: ModelArgs, dtype: torch.dtype | None) -> dict:
    """config.json for a checkpoint we write: the source config with our dtype and, for MoE, the expert
    layout we save in (`transformers_version` dropped: it described the source, not our tensors)."""
    cfg = copy.deepcopy(args.hf_config)
    dname = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    cfg["dtype"] = dname
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dname
    if not cfg.get("architectures"):
        cfg["architectures"] = [
            "Qwen3VLMoeForConditionalGeneration" if args.is_moe else "Qwen3VLForConditionalGeneration"
        ]
    if args.is_moe:
        cfg.pop("transformers_version", None)
        cfg[LAYOUT_KEY] = HUB
    return cfg


# ------------------------------------------------------------------------------------------------------
# MoE expert layouts


def _layout_from_version(version: str) -> str:
    major = int(str(version).split(".")[0])
    return TRANSFORMERS5 if major >= 5 else HUB


def recorded_layout(cfg: dict) -> tuple[str | None, str]:
    """(layout, why) from the facts config.json records; layout None when it records none.

    Our metadata counts only while `transformers_version` is absent: we drop that key on save, and
    transformers writes it back whenever it re-saves (and re-lays out) the weights.
    """
    ours = cfg.get(LAYOUT_KEY)
    version = cfg.get("transformers_version")
    if ours is not None and version is None:
        if ours not in (HUB, TRANSFORMERS5):
            raise ValueError(f"'{LAYOUT_KEY}' is {ours!r}; expected '{HUB}' or '{TRANSFORMERS5}'")
        return ours, f"'{LAYOUT_KEY}': '{ours}'"
    if version is not None:
        try:
            return _layout_from_version(version), f"'transformers_version': '{version}'"
        except ValueError:
            raise ValueError(f"'transformers_version' {version!r} is not a version number") from None
    return None, "no 'transformers_version' and no '" + LAYOUT_KEY + "'"


def _hub_shape(name: str, args: ModelArgs) -> tuple[int, int, int]:
    t = args.text
    if name.endswith("gate_up_proj"):
        return (t.num_experts, t.hidden_size, 2 * t.moe_intermediate_size)
    return (t.num_experts, t.moe_intermediate_size, t.hidden_size)


def _has_square_experts(args: ModelArgs) -> bool:
    """A square expert matrix ([H, 2I] with 2I == H, or [I, H] with I == H) cannot reveal its layout."""
    t = args.text
    return 2 * t.moe_intermediate_size == t.hidden_size or t.moe_intermediate_size == t.hidden_size


def expert_tensor_from_hf(name: str, tensor: torch.Tensor, args: ModelArgs, ctx: dict) -> torch.Tensor:
    """A checkpoint's `mlp.experts.{gate_up_proj,down_proj}` -> our (hub) layout.

    A shape that fits only one layout decides for itself; a square one is decided by the facts config.json
    records, and refused when it records none or when another expert tensor contradicts them."""
    hub = _hub_shape(name, args)
    t5 = (hub[0], hub[2], hub[1])
    where = os.path.join(ctx.get("checkpoint_dir", "."), "config.json")
    if "moe_layout" not in ctx:
        try:
            ctx["moe_layout"] = recorded_layout(args.hf_config)
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
    layout, why = ctx["moe_layout"]
    shape = tuple(tensor.shape)
    if shape not in (hub, t5):
        raise CheckpointError(
            f"{where}: '{name}' has shape {shape}; expected {hub} (hub) or {t5} (transformers 5)"
        )
    if hub != t5:
        found = HUB if shape == hub else TRANSFORMERS5
        # If this model also has a square expert tensor, the facts decide it: they must hold here too.
        if layout is not None and found != layout and _has_square_experts(args):
            raise CheckpointError(
                f"{where}: records the {layout} expert layout ({why}) but '{name}' has the {found} shape "
                f"{shape}; this model's square expert tensors cannot be checked by shape, so the checkpoint is "
                f"refused. Set '{LAYOUT_KEY}' in config.json to the layout the weights use and remove "
                f"'transformers_version'."
            )
        return tensor if found == HUB else tensor.transpose(1, 2).contiguous()
    if layout is None:
        raise CheckpointError(
            f"{where}: '{name}' has shape {shape}, identical in both expert layouts "
            f"(2*moe_intermediate_size == hidden_size), and the config records {why}. Add "
            f'\'"{LAYOUT_KEY}": "{HUB}"\' (weights as on the Hub / transformers 4.57: gate_up_proj [E, H, 2I]) or '
            f'\'"{LAYOUT_KEY}": "{TRANSFORMERS5}"\' (written by transformers 5 save_pretrained) to config.json.'
        )
    return tensor if layout == HUB else tensor.transpose(1, 2).contiguous()
