"""Inference: KV-cache generation, evaluation, chat, and model loading for `vlmtune chat` / `vlmtune eval`."""

from vlmtune.generation.answers import normalize_answer, reference_answer
from vlmtune.generation.batched import generate_batched
from vlmtune.generation.cache import KVCache
from vlmtune.generation.generate import Step, generate, left_pad, stream
from vlmtune.generation.sampling import SamplingOptions

from .chat import ChatSession
from .evaluate import evaluate
from .load import load_model, stop_token_ids

__all__ = [
    "ChatSession",
    "KVCache",
    "SamplingOptions",
    "Step",
    "evaluate",
    "generate",
    "generate_batched",
    "left_pad",
    "load_model",
    "normalize_answer",
    "reference_answer",
    "stop_token_ids",
    "stream",
]
