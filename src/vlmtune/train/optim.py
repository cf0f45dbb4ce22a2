"""AdamW with per-group learning rates and the warmup + decay schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .freeze import group_of


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """Only trainable parameters get optimizer state. Groups: (freeze group) x (decay / no decay);
    norms, biases and 1-D tensors are not decayed. Each group's `lr_scale` is its peak lr / optim.lr."""
    o = cfg.optim
    peak = {
        "vision_encoder": o.vision_encoder_lr,
        "vision_projector": o.vision_projector_lr,
        "text_decoder": None,
    }
    buckets: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "norm" not in name
        buckets.setdefault((group_of(name), decay), []).append(p)
    groups = []
    for (group, decay), params in sorted(buckets.items()):
        lr = peak[group] if peak[group] is not None else o.lr
        groups.append(
            {
                "params": params,
                "name": f"{group}{'' if decay else '_no_decay'}",
                "lr": lr,
                "lr_scale": lr / o.lr,
                "weight_decay": o.weight_decay if decay else 0.0,
            }
        )
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def lr_factor(step: int, total_steps: int, cfg) -> float:
    """Multiplier on the peak lr at `step` (0-based): linear warmup, then cosine/linear decay to min_lr."""
    o = cfg.optim
    warmup = o.warmup_steps or int(round(o.warmup_fraction * total_steps))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = o.min_lr / o.lr
    if o.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * (1 - progress)


class Schedule:
    """Sets every group's lr for a step; its state is just the step it last set."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, cfg):
        self.optimizer, self.total_steps, self.cfg = optimizer, total_steps, cfg
        self.step_set = 0

    def set(self, step: int) -> float:
        factor = lr_factor(step, self.total_steps, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.optim.lr * g["lr_scale"] * factor
        self.step_set = step
        return self.cfg.optim.lr * factor

    def state_dict(self) -> dict:
        return {"step_set": self.step_set, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_set = state["step_set"]
