"""Hugging Face checkpoints: streaming load onto a meta-built model, sharded safetensors save.

Names and the tensors whose layout differs (patch embedding, fused vision qkv, MoE experts) are converted by
`models/qwen3_vl/state_dict_adapter.py`; this file reads and writes the files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmtune.errors import CheckpointError, VlmtuneError
from vlmtune.models.qwen3_vl import ModelArgs, Qwen3VL, build_model, load_config
from vlmtune.models.qwen3_vl.state_dict_adapter import (
    hf_to_native_name,
    saved_config,
    tensors_from_hf,
    to_hf_items,
)

from .peft import load_adapter

log = logging.getLogger(__name__)

# Tokenizer, chat template and processor files that travel with a checkpoint.
ASSET_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


def copy_assets(src: str, dst: str, *, with_config: bool = False) -> None:
    """Copy the tokenizer/processor files (and `config.json` when asked) that exist in `src` to `dst`."""
    if not src or os.path.abspath(src) == os.path.abspath(dst):
        return
    for name in (("config.json",) if with_config else ()) + ASSET_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(
                f"{index}: unreadable shard index ({type(e).__name__}: {e}); expected "
                '{"weight_map": {tensor name: shard file}}'
            ) from None
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise CheckpointError(
                f"{index}: lists shard(s) that do not exist: {missing}; the download or copy is incomplete"
            )
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json found")


@contextmanager
def open_safetensors(file: str):
    """`safe_open` whose failures (a damaged header, a truncated file) are CheckpointErrors naming the file."""
    try:
        handle = safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...: the file cannot be read as safetensors
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({e}); it is damaged or incomplete: copy it again"
        ) from None
    with handle as f:
        yield _Checked(f, file)


class _Checked:
    """A safetensors handle whose reads name the file and tensor when they fail."""

    def __init__(self, handle, file: str):
        self.handle, self.file = handle, file

    def keys(self):
        return self.handle.keys()

    def get_slice(self, name: str):
        return self.handle.get_slice(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        try:
            return self.handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(
                f"{self.file}: cannot read tensor '{name}' ({e}); the file is damaged"
            ) from None


def iter_checkpoint(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, tensor) for every tensor, one at a time."""
    for file in checkpoint_files(path):
        with open_safetensors(file) as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _config_dtype(args: ModelArgs) -> torch.dtype:
    name = args.hf_config.get("dtype") or args.hf_config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"config.json: dtype {name!r} is not a floating-point torch dtype")
    return dtype


def load_pretrained(path, dtype: torch.dtype | str | None = None, device=None, adapter=None) -> Qwen3VL:
    """Build on the meta device, allocate once on `device`, stream tensors in one by one; `adapter`: a PEFT
    LoRA adapter directory put on the model (checkpoint/peft.py)."""
    path = os.fspath(path)
    args = load_config(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = build_model(args, dtype=dtype or _config_dtype(args), device=device or "cpu")
    load_weights(model, path)
    model.source_dir = path
    if adapter:
        load_adapter(model, adapter)
    return model


@torch.no_grad()
def load_weights(model, path: str, names: set[str] | None = None, *, partial: bool = False) -> None:
    """Copy checkpoint tensors into `model`'s (already allocated) parameters; `names` limits which ones.

    `partial=True` is for a pruned model (a pipeline stage): tensors of modules it does not hold are skipped."""
    args = model.args
    params = dict(model.named_parameters(remove_duplicate=False))
    wanted = set(params) if names is None else set(names)
    if args.tie_word_embeddings:
        wanted.discard("lm_head.weight")
    ctx: dict = {"checkpoint_dir": path}
    loaded, unexpected, casts = set(), [], set()
    for hf_name, tensor in iter_checkpoint(path):
        name = hf_to_native_name(hf_name)
        if name == "lm_head.weight" and args.tie_word_embeddings:
            continue  # tied: the embedding is the source of truth
        if name is None:
            unexpected.append(hf_name)
            continue
        for native, value in converted(path, hf_name, name, tensor, args, ctx):
            if native not in params:
                if not partial:
                    unexpected.append(hf_name)
                continue
            if native not in wanted:
                continue
            param = params[native]
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{path}: '{hf_name}' has shape {tuple(tensor.shape)}, the config implies {tuple(param.shape)}"
                )
            check_dtype(path, hf_name, value.dtype, param.dtype, casts)
            param.copy_(value.to(param.dtype))
            loaded.add(native)
    for src, dst in sorted(casts, key=str):
        log.info("%s: %s weights loaded as %s", path, *(str(t).replace("torch.", "") for t in (src, dst)))
    if unexpected:
        raise CheckpointError(f"{path}: tensors the model does not have: {sorted(unexpected)[:10]}")
    missing = sorted(wanted - loaded)
    if missing:
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {missing[:10]}")


def converted(path, hf_name, name, tensor, args, ctx):
    """The native tensors of one checkpoint tensor; a layout that does not fit is a CheckpointError."""
    try:
        return list(tensors_from_hf(name, tensor, args, ctx))
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, IndexError) as e:
        raise CheckpointError(
            f"{path}: '{hf_name}' with shape {tuple(tensor.shape)} does not fit the config ({e})"
        ) from None


def check_dtype(path: str, hf_name: str, saved: torch.dtype, wanted: torch.dtype, casts: set) -> None:
    """Float weights load into any float dtype (said once per pair); anything else is refused."""
    if saved == wanted:
        return
    if saved.is_floating_point == wanted.is_floating_point and saved.is_complex == wanted.is_complex:
        casts.add((saved, wanted))
        return
    raise CheckpointError(
        f"{path}: '{hf_name}' is stored as {saved}, but the model's weight is {wanted}; a quantized or "
        "integer checkpoint cannot be trained or run here: use the floating-point (bf16 / fp16 / fp32) weights"
    )


def hf_state_items(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, tensor) in checkpoint layout; the tied lm_head is skipped as transformers does."""
    state = model.state_dict()
    return to_hf_items(list(state), lambda name: state[name].detach(), model.args)


def save_pretrained(model, out_dir, *, source_dir=None, max_shard_bytes: int = 5 * 2**30) -> None:
    """HF-layout safetensors shards + index + config.json (+ tokenizer/processor files from the source)."""
    src = source_dir or getattr(model, "source_dir", None)
    write_hf_checkpoint(
        hf_state_items(model), model.args, out_dir, source_dir=src, max_shard_bytes=max_shard_bytes
    )


def _shard_plan(sizes: list[int], max_shard_bytes: int) -> list[int]:
    """Shard index of each tensor (in order), starting a new shard when the next tensor would overflow."""
    plan, shard, size = [], 0, 0
    for nbytes in sizes:
        if size and size + nbytes > max_shard_bytes:
            shard, size = shard + 1, 0
        plan.append(shard)
        size += nbytes
    return plan


def ensure_dir(path: str, what: str, error: type[VlmtuneError] = CheckpointError) -> None:
    """Create the output directory `path` (named `what` in the `error` raised when that is impossible)."""
    try:
        os.makedirs(path, exist_ok=True)
    except (OSError, ValueError) as e:  # ValueError: a NUL character in the path
        raise error(
            f"{what} {path!r}: cannot create the directory ({getattr(e, 'strerror', None) or e})"
        ) from None


def write_hf_checkpoint(
    items, args: ModelArgs, out_dir, *, source_dir=None, max_shard_bytes: int = 5 * 2**30, sizes=None
) -> None:
    """Write (hf_name, tensor) pairs as HF safetensors shards, holding one shard in memory at a time.

    `sizes` (bytes of each item, in order) lets a streaming source name shards `-of-N` before reading any
    tensor; without it the items are materialised first (a model already in memory).
    """
    out_dir = os.fspath(out_dir)
    ensure_dir(out_dir, "output")
    if sizes is None:
        items = list(items)
        sizes = [t.numel() * t.element_size() for _, t in items]
    plan = _shard_plan(sizes, max_shard_bytes)
    n = (plan[-1] + 1) if plan else 1
    weight_map, total, dtype = {}, 0, None
    shard: dict[str, torch.Tensor] = {}

    def flush(index: int) -> None:
        nonlocal total
        fname = f"model-{index + 1:05d}-of-{n:05d}.safetensors"
        cpu = {k: v.to("cpu").contiguous().clone() if v.is_cuda else v.contiguous() for k, v in shard.items()}
        save_file(cpu, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for k, v in cpu.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
        shard.clear()

    current = 0
    for (hf_name, tensor), index in zip(items, plan):
        if index != current:
            flush(current)
            current = index
        shard[hf_name] = tensor
        dtype = dtype or tensor.dtype
    flush(current)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2
        )
    stale = os.path.join(out_dir, "model.safetensors")
    if os.path.exists(stale):
        os.remove(stale)  # transformers would prefer a single file left by an earlier save
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(saved_config(args, dtype), f, indent=2)
    copy_assets(source_dir, out_dir)
