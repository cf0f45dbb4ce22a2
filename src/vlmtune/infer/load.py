"""Loading a model for inference from a Hugging Face directory or a training checkpoint (the token ids
generation needs from its tokenizer files are in `generation/tokens.py`)."""

from __future__ import annotations

import os

import torch

from vlmtune.checkpoint import load_model_from_checkpoint, load_pretrained
from vlmtune.checkpoint.peft import load_adapter
from vlmtune.errors import CheckpointError, ConfigError
from vlmtune.generation.tokens import pad_token_id, stop_token_ids

__all__ = ["is_hf_dir", "load_model", "pad_token_id", "pick_device", "processor_dir", "stop_token_ids"]


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "fp32": "float32",
        "half": "float16",
        "float": "float32",
    }
    value = getattr(torch, aliases.get(name, name), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return value


def pick_device(name: str | None) -> torch.device:
    """`--device`: cpu, cuda, cuda:1, ... (default: cuda when available, else cpu), checked before loading."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise ConfigError(f"--device {name}: no such CUDA device is visible; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: only cpu and cuda are supported")
    return device


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_model(path, *, dtype=None, device=None, adapter=None):
    """The native model in eval mode, from an HF checkpoint directory (`config.json` + safetensors) or from a
    training checkpoint written by `vlmtune train` (a step directory, or a run / checkpoints directory whose
    `latest` pointer names one).

    `dtype` None keeps the checkpoint's dtype; `device` None is the CPU. `adapter`: a PEFT LoRA adapter
    directory put on the model (`vlmtune chat/eval --adapter`).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{path}: not a directory; pass a Hugging Face checkpoint directory (config.json + *.safetensors) "
            "or a training checkpoint directory from `vlmtune train`"
        )
    dtype = _dtype(dtype)
    if is_hf_dir(path):
        model = load_pretrained(path, dtype=dtype, device=device, adapter=adapter)
    else:
        try:
            model = load_model_from_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; nor is it a Hugging Face checkpoint (no config.json)") from e
        if adapter:
            load_adapter(model, adapter)
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
    return model.eval()


def processor_dir(model, model_path) -> str:
    """Where the tokenizer and preprocessor configs of `model` live: the HF directory it was loaded from, or
    the one a training checkpoint was initialised from."""
    for candidate in (getattr(model, "source_dir", None), os.fspath(model_path)):
        if candidate and os.path.isfile(os.path.join(candidate, "tokenizer_config.json")):
            return candidate
    raise CheckpointError(
        f"{model_path}: no tokenizer files found with the model; pass --processor DIR "
        "(a Hugging Face directory with tokenizer_config.json and preprocessor_config.json)"
    )
