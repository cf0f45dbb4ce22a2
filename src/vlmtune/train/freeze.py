"""Freeze groups, parameter by parameter.

- vision_encoder:   visual.patch_embed.*, visual.pos_embed.* (the learned position table), visual.blocks.*
- vision_projector: visual.merger.*, visual.deepstack_merger_list.* (every DeepStack merger)
- text_decoder:     language_model.embed_tokens.*, language_model.layers.*, language_model.norm.*, lm_head.*

Every parameter belongs to exactly one group; a parameter matching none is an error (a new module must be
placed in a group deliberately, not silently left trainable or frozen).
"""

from __future__ import annotations

from torch import nn

GROUP_PREFIXES = {
    "vision_encoder": ("visual.patch_embed.", "visual.pos_embed.", "visual.blocks."),
    "vision_projector": ("visual.merger.", "visual.deepstack_merger_list."),
    "text_decoder": (
        "language_model.embed_tokens.",
        "language_model.layers.",
        "language_model.norm.",
        "lm_head.",
    ),
}


def _clean(name: str) -> str:
    # Wrappers (activation checkpointing, torch.compile) may insert a path component.
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def group_of(name: str) -> str:
    name = _clean(name)
    for group, prefixes in GROUP_PREFIXES.items():
        if name.startswith(prefixes):
            return group
    raise ValueError(f"parameter {name!r} belongs to no freeze group; add it to GROUP_PREFIXES")


def freeze_groups(model: nn.Module) -> dict[str, list[str]]:
    """Group -> parameter names (tied parameters listed under every name they have)."""
    groups: dict[str, list[str]] = {g: [] for g in GROUP_PREFIXES}
    for name, _ in model.named_parameters(remove_duplicate=False):
        groups[group_of(name)].append(name)
    return groups


def apply_freeze(model: nn.Module, freeze) -> dict[str, int]:
    """Set `requires_grad=False` on the frozen groups; returns trainable parameter counts per group."""
    frozen = {g for g in GROUP_PREFIXES if getattr(freeze, g)}
    trainable = dict.fromkeys(GROUP_PREFIXES, 0)
    for name, p in model.named_parameters():
        group = group_of(name)
        p.requires_grad_(group not in frozen)
        if p.requires_grad:
            trainable[group] += p.numel()
    return trainable
