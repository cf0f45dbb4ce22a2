"""Native Qwen3-VL (dense and MoE) as plain nn.Modules."""

from .config import ConfigError, ModelArgs, TextArgs, VisionArgs, args_from_hf_dict, load_config
from .hf_io import CheckpointError, load_pretrained, save_pretrained
from .model import ModelOutput, Qwen3VL
from .rope import get_rope_index

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ModelArgs",
    "ModelOutput",
    "Qwen3VL",
    "TextArgs",
    "VisionArgs",
    "args_from_hf_dict",
    "get_rope_index",
    "load_config",
    "load_pretrained",
    "save_pretrained",
]
