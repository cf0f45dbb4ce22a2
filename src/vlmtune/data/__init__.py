"""Data pipeline: datasets (messages / LLaVA format) -> encoded samples -> packed, resumable micro-batches."""

from .batch import PackedBatch, pack
from .config import DataConfig
from .loader import build_loader
from .processor import Processor, build_processor
from .report import BadSample, SkipReport
from .samples import load_samples

__all__ = [
    "BadSample",
    "DataConfig",
    "PackedBatch",
    "Processor",
    "SkipReport",
    "build_loader",
    "build_processor",
    "load_samples",
    "pack",
]
