"""vlmtune: fine-tune Qwen3-VL vision-language models, from Hugging Face weights back to Hugging Face weights."""

from vlmtune.checkpoint.hf import load_pretrained, save_pretrained
from vlmtune.models.qwen3_vl import Qwen3VL

__version__ = "0.1.0"
__all__ = ["Qwen3VL", "load_pretrained", "save_pretrained", "__version__"]
