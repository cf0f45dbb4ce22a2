"""Training checkpoint / sharded model -> Hugging Face directory (`vlmtune export`), and loading a training
checkpoint's model for inference."""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from vlmtune.errors import CheckpointError
from vlmtune.models.qwen3_vl import Qwen3VL, build_model, load_config
from vlmtune.parallel.collectives import barrier

from .convert import native_to_hf
from .dcp import assets_dir, dcp_load, read_dcp_metadata, resolve
from .hf import save_pretrained


def export_model(model: Qwen3VL, out_dir: str, *, source_dir: str) -> None:
    """Gather a (possibly FSDP-sharded) model's full weights on rank 0 and write them in HF format."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        plain = build_model(model.args)
        plain.load_state_dict(full, assign=True, strict=False)
        plain.tie_weights()
        missing = [n for n, p in plain.named_parameters() if p.is_meta]
        if missing:
            raise CheckpointError(f"export: weights missing from the gathered state: {missing[:5]}")
        save_pretrained(plain, out_dir, source_dir=source_dir)
    barrier()


def load_model_from_checkpoint(path: str) -> Qwen3VL:
    """The full model of a training checkpoint (step dir, or a run dir / checkpoints dir with `latest`),
    on the CPU in its master dtype; `model.source_dir` points at the tokenizer/processor files saved with it."""
    path = resolve(os.fspath(path))
    assets = assets_dir(path)
    args = load_config(assets)
    model = build_model(args, dtype=_saved_dtype(path), device="cpu")
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "loading in a single process" is the intent here
        warnings.simplefilter("ignore", UserWarning)
        dcp_load(state, path)  # fills the model's tensors in place, from any number of shards
    model.source_dir = assets
    return model


def _saved_dtype(path: str) -> torch.dtype:
    meta = read_dcp_metadata(path)
    for key, item in meta.state_dict_metadata.items():
        if key.startswith("model.") and hasattr(item, "properties"):
            return item.properties.dtype
    return torch.float32


def export_checkpoint(path: str, out_dir: str) -> str:
    """`vlmtune export`: streamed tensor by tensor (the conversion `vlmtune convert native-to-hf` runs)."""
    return native_to_hf(path, out_dir)
