"""The model as training runs it: built on the meta device, frozen groups marked, parallelised (TP, EP,
activation checkpointing, FSDP, pipeline stages), then allocated shard by shard and filled from the Hugging
Face checkpoint — each rank holds and reads only its slices, streamed one tensor at a time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn
from torch.distributed.tensor.experimental import implicit_replication

from vlmtune.checkpoint.hf import load_weights
from vlmtune.models.qwen3_vl import Qwen3VL, build_model, load_config, materialize
from vlmtune.models.qwen3_vl.moe import sparse_blocks
from vlmtune.parallel.fsdp import parallelize
from vlmtune.parallel.pipeline import PipelineStageModule, build_pipeline
from vlmtune.parallel.pipeline_rank import TiedEmbedding
from vlmtune.parallel.tensor import apply_tensor_parallel


def _allocate_and_load(root: nn.Module, model: Qwen3VL, path: str, device, partial: bool = False) -> None:
    materialize(root, device)
    # A full checkpoint tensor copied into a sharded parameter keeps only this rank's slice (no comms).
    with implicit_replication():
        load_weights(model, path, partial=partial)
    model.source_dir = path


def build_sharded_model(
    path: str,
    root_factory: Callable[[Qwen3VL], nn.Module],
    info,
    *,
    dtype: torch.dtype = torch.float32,
    mixed_precision: str = "fp32",
    activation_checkpointing: str = "none",
    compile: bool = False,
    prepare: Callable[[Qwen3VL], object] | None = None,
):
    """Meta build -> `prepare(model)` (freezing) -> tensor parallelism -> `root_factory(model)` (the module
    whose forward the trainer calls, the FSDP root) -> EP, checkpointing, FSDP -> allocation and loading.
    `info` is the DistInfo of `parallel.mesh.init_distributed`. Returns (root, model)."""
    model = build_model(load_config(path), dtype=dtype)
    if prepare is not None:
        prepare(model)
    if info.parallel.tp > 1:
        # Training never gathers logits: the chunked loss is vocab-parallel (see parallel/loss.py).
        apply_tensor_parallel(model, info.mesh["tp"], gather_logits=False)
    root = root_factory(model)
    parallelize(
        root, model, info, dtype=dtype, mixed_precision=mixed_precision,
        activation_checkpointing=activation_checkpointing, compile=compile,
    )  # fmt: skip
    _allocate_and_load(root, model, path, info.device)
    return root, model


def build_sharded_pipeline(
    path: str,
    info,
    *,
    n_microbatches: int,
    length: int,
    dtype: torch.dtype = torch.float32,
    mixed_precision: str = "fp32",
    activation_checkpointing: str = "none",
    compile: bool = False,
    prepare: Callable[[Qwen3VL], object] | None = None,
    chunk_size: int = 4096,
):
    """This rank's pipeline stage(s) for training: meta build -> `prepare` (freezing) -> tensor parallelism
    (of the whole model, before the stage prunes it) -> prune to the stage -> EP, checkpointing, FSDP over the
    data-parallel ranks -> allocation and loading of the stage's own tensors. Returns (schedule, stage
    modules, TiedEmbedding or None)."""
    p = info.parallel
    args = load_config(path)
    compute = torch.bfloat16 if mixed_precision == "bf16" else dtype  # activations between stages

    def factory() -> Qwen3VL:
        model = build_model(args, dtype=dtype)
        if prepare is not None:
            prepare(model)
        if p.tp > 1:
            apply_tensor_parallel(model, info.mesh["tp"], gather_logits=False)
        return model

    def wrap(stage: PipelineStageModule) -> nn.Module:
        # Expert parallelism only where the stage holds sparse layers (a vision-only stage has none).
        stage_info = info if sparse_blocks(stage.model) else replace(info, parallel=replace(p, ep=1))
        parallelize(
            stage, stage.model, stage_info, dtype=dtype, mixed_precision=mixed_precision,
            activation_checkpointing=activation_checkpointing, compile=compile,
        )  # fmt: skip
        _allocate_and_load(stage, stage.model, path, info.device, partial=True)
        stage.dummy_vision, stage.chunk_size = True, chunk_size
        return stage

    schedule, stages = build_pipeline(
        factory,
        info.mesh["pp"],
        llm_pp_layers=p.llm_pp_layers,
        vit_pp_layers=p.vit_pp_layers or None,
        n_microbatches=n_microbatches,
        schedule=p.pp_schedule,
        length=length,
        device=info.device,
        dtype=compute,
        wrap=wrap,
    )
    tied = TiedEmbedding(stages, info.mesh.root.mesh, p.pp) if args.tie_word_embeddings else None
    return schedule, stages, tied
