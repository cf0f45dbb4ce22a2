"""What a run derives from its config before it builds anything: the checks the config alone decides (the
layout against the world size and the model, the `lora:` targets, generation under the layout), the
micro-batches per step and the step count, the MoE aux-loss coefficient, the seed and the output directory."""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from vlmtune.checkpoint.hf import ensure_dir
from vlmtune.errors import ConfigError
from vlmtune.models.qwen3_vl import ModelArgs
from vlmtune.parallel.layout import ParallelConfig, resolve

from .config import TrainConfig
from .lora import check_lora_model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def accumulation_steps(cfg: TrainConfig, micro_batches_per_epoch: int, n_train: int, world: int) -> int:
    """Micro-batches per rank per optimizer step, derived from the global batch
    (`micro_batches_per_epoch` is this rank's count)."""
    t = cfg.train
    if t.global_batch_tokens:
        return max(1, round(t.global_batch_tokens / (t.micro_batch_tokens * world)))
    if t.global_batch_samples:
        per_micro = n_train / max(1, micro_batches_per_epoch * world)  # mean samples in a packed micro-batch
        return max(1, round(t.global_batch_samples / (per_micro * world)))
    return 1


def total_steps(cfg: TrainConfig, micro_batches_per_epoch: int, accum: int) -> int:
    if cfg.train.train_iters:
        return cfg.train.train_iters
    return max(1, math.ceil(cfg.train.epochs * max(1, micro_batches_per_epoch // accum)))


def aux_coef(cfg: TrainConfig, args: ModelArgs) -> float:
    """MoE aux-loss coefficient: configured, else the checkpoint's `router_aux_loss_coef` (0 for dense)."""
    return cfg.loss.aux_loss_coef if cfg.loss.aux_loss_coef is not None else args.text.router_aux_loss_coef


def check_config(cfg: TrainConfig, args: ModelArgs, world: int) -> ParallelConfig:
    """Everything the config alone decides, before any process group, data or weights: the layout against
    the world size and the model (heads, layers, experts, the pipeline split and schedule), and what the
    `lora:` section selects in this model."""
    layout = resolve(cfg.parallel, world, args)
    check_lora_model(cfg, args)
    check_generation(cfg, layout)
    return layout


def check_generation(cfg: TrainConfig, layout: ParallelConfig) -> None:
    if cfg.eval.generate and layout.pp > 1:
        raise ConfigError(
            "eval.generate under pipeline parallelism (parallel.pp > 1): not built yet (no stage holds the "
            "whole model to decode with); set eval.generate: false, or score a saved checkpoint with "
            "`vlmtune eval --generate`"
        )


def make_output_dir(path: str) -> None:
    ensure_dir(path, "output_dir", ConfigError)
