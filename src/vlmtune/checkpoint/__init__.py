"""Checkpoint formats: Hugging Face safetensors (load / save), sharded DCP training checkpoints with atomic
publishing, streaming conversion between the two, and export."""

from .convert import hf_to_native, native_to_hf
from .dcp import latest, publish, resolve
from .export import export_checkpoint, export_model, load_model_from_checkpoint
from .hf import ASSET_FILES, copy_assets, load_pretrained, load_weights, save_pretrained

__all__ = [
    "ASSET_FILES",
    "copy_assets",
    "export_checkpoint",
    "export_model",
    "hf_to_native",
    "latest",
    "load_model_from_checkpoint",
    "load_pretrained",
    "load_weights",
    "native_to_hf",
    "publish",
    "resolve",
    "save_pretrained",
]
