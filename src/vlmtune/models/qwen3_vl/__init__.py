"""Native Qwen3-VL (dense and MoE) as plain nn.Modules."""

from .config import ModelArgs, TextArgs, VisionArgs, args_from_hf_dict, load_config
from .model import ModelOutput, Qwen3VL, build_model, materialize, shift_labels
from .rope import get_rope_index

__all__ = [
    "ModelArgs",
    "ModelOutput",
    "Qwen3VL",
    "TextArgs",
    "VisionArgs",
    "args_from_hf_dict",
    "build_model",
    "get_rope_index",
    "load_config",
    "materialize",
    "shift_labels",
]
