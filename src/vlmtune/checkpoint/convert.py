"""Streaming conversion between Hugging Face checkpoints and native (DCP) checkpoints.

Neither direction holds the model in memory:
- hf-to-native plans the DCP checkpoint from tensor shapes alone (a meta-device state dict) and reads each
  tensor from its safetensors shard only when DCP writes it (`resolve_data`);
- native-to-hf reads one tensor at a time from the DCP shards (a partial `dcp.load`) and writes HF shards
  as they fill, so the peak is about one output shard (5 GiB by default) plus one tensor.

A native checkpoint has no layout baked in: DCP stores every tensor whole (FSDP, TP and EP shards are
DTensor slices of it) and reshards on load, so a converted checkpoint starts any `parallel:` layout, and
pipeline stages load just the keys they own. It is model-only: resume it with `checkpoint.no_load_optim`
and `checkpoint.no_load_rng` (the trainer's first save then adds both).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from vlmtune.errors import CheckpointError
from vlmtune.models.qwen3_vl import build_model, load_config
from vlmtune.models.qwen3_vl.state_dict_adapter import hf_to_native_name, tensors_from_hf, to_hf_items

from .dcp import HF_ASSETS, MODEL_PREFIX, assets_dir, model_tensors, publish, resolve, step_name
from .hf import (
    check_dtype,
    checkpoint_files,
    converted,
    copy_assets,
    ensure_dir,
    open_safetensors,
    write_hf_checkpoint,
)


class _LazyHFPlanner(DefaultSavePlanner):
    """Plans from meta tensors; loads each tensor from its HF shard when DCP writes it."""

    def __init__(self, sources: dict[str, tuple[str, str]], args, hf_dir: str):
        super().__init__()
        self.sources, self.args, self.ctx = sources, args, {"checkpoint_dir": hf_dir}
        self._cached: tuple[str, list] | None = None  # the last HF tensor's native pieces (q/k/v share one)

    def resolve_data(self, write_item):
        key = write_item.index.fqn
        file, hf_name = self.sources[key]
        if self._cached is None or self._cached[0] != hf_name:
            with open_safetensors(file) as f:
                tensor = f.get_tensor(hf_name)
            self._cached = (hf_name, tensors_from_hf(hf_to_native_name(hf_name), tensor, self.args, self.ctx))
        return dict(self._cached[1])[key[len(MODEL_PREFIX) :]].contiguous()


def hf_to_native(hf_dir: str, out_dir: str) -> str:
    """Write `out_dir/checkpoints/step_00000000` (+ `latest`) holding the HF weights as a native checkpoint."""
    args = load_config(hf_dir)
    meta_state, sources = _plan_from_hf(hf_dir, args)
    root = os.path.join(out_dir, "checkpoints")
    ensure_dir(root, "--out")
    tmp = os.path.join(root, f".tmp_{step_name(0)}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process on purpose
        dcp.save(meta_state, checkpoint_id=tmp, planner=_LazyHFPlanner(sources, args, hf_dir), no_dist=True)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(
            {"step": 0, "world_size": 1, "has_optim": False, "has_rng": False, "converted_from": hf_dir},
            f,
            indent=2,
        )
    os.makedirs(os.path.join(tmp, HF_ASSETS))
    copy_assets(hf_dir, os.path.join(tmp, HF_ASSETS), with_config=True)
    return publish(tmp, root, step_name(0))


def _plan_from_hf(hf_dir: str, args) -> tuple[dict, dict]:
    """Meta tensors of the native checkpoint and the (file, HF name) each comes from, checked against the
    model the config describes (names, shapes, floating-point dtypes) before anything is written."""
    expected = dict(build_model(args).state_dict())  # meta: shapes only
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    meta_state, sources = {}, {}
    ctx = {"checkpoint_dir": hf_dir}
    for file in checkpoint_files(hf_dir):
        with open_safetensors(file) as f:
            for hf_name in f.keys():
                name = hf_to_native_name(hf_name)
                if name is None:
                    raise CheckpointError(f"{file}: tensor '{hf_name}' is not a Qwen3-VL weight")
                if name == "lm_head.weight" and args.tie_word_embeddings:
                    continue
                sl = f.get_slice(hf_name)
                dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise CheckpointError(
                        f"{file}: '{hf_name}' is stored as {sl.get_dtype()}; use the floating-point (bf16 / fp16 "
                        "/ fp32) weights"
                    )
                probe = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
                for native, value in converted(file, hf_name, name, probe, args, ctx):
                    want = expected.get(native)
                    if want is None:
                        raise CheckpointError(
                            f"{file}: tensor '{hf_name}' is not part of this model's config"
                        )
                    if tuple(value.shape) != tuple(want.shape):
                        raise CheckpointError(
                            f"{file}: '{hf_name}' has shape {tuple(sl.get_shape())}, the config implies "
                            f"{tuple(want.shape)}"
                        )
                    check_dtype(file, hf_name, dtype, torch.float32, set())
                    meta_state[MODEL_PREFIX + native] = torch.empty(value.shape, dtype=dtype, device="meta")
                    sources[MODEL_PREFIX + native] = (file, hf_name)
    missing = sorted(set(expected) - {k[len(MODEL_PREFIX) :] for k in meta_state})
    if missing:
        raise CheckpointError(f"{hf_dir}: tensors missing from the checkpoint: {missing[:10]}")
    return meta_state, sources


def native_to_hf(ckpt: str, out_dir: str, *, max_shard_bytes: int = 5 * 2**30) -> str:
    """Stream a native checkpoint's model tensors into a Hugging Face directory."""
    path = resolve(os.fspath(ckpt))
    assets = assets_dir(path)
    args = load_config(assets)
    props, get = model_tensors(path)
    names = list(props)
    if not names:
        raise CheckpointError(f"{path}: no model tensors in this checkpoint")

    # Byte sizes of the HF tensors in order (fused q/k/v count once, with the three parts' bytes).
    sizes = [
        t.numel() * t.element_size() for _, t in to_hf_items(names, lambda n: _meta_tensor(props[n]), args)
    ]
    write_hf_checkpoint(
        to_hf_items(names, get, args),
        args,
        out_dir,
        source_dir=assets,
        max_shard_bytes=max_shard_bytes,
        sizes=sizes,
    )
    return out_dir


def _meta_tensor(props) -> torch.Tensor:
    return torch.empty(props.size, dtype=props.properties.dtype, device="meta")


SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "F8_E4M3": torch.float8_e4m3fn,
}
