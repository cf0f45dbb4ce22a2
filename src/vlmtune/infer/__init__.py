"""Inference: KV-cache generation, evaluation, chat, and model loading for `vlmtune chat` / `vlmtune eval`."""

from .cache import KVCache
from .chat import ChatSession
from .evaluate import evaluate, normalize_answer, reference_answer
from .generate import Step, generate, left_pad, stream
from .load import load_model, stop_token_ids
from .sampling import SamplingOptions

__all__ = [
    "ChatSession",
    "KVCache",
    "SamplingOptions",
    "Step",
    "evaluate",
    "generate",
    "left_pad",
    "load_model",
    "normalize_answer",
    "reference_answer",
    "stop_token_ids",
    "stream",
]
