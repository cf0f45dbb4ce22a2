"""The errors vlmtune raises on purpose: bad configs, data, checkpoints and parallel layouts.

Every command catches `VlmtuneError`, prints `error: <message>` and exits with status 2; any other
exception is a bug and keeps its traceback. Messages say what is wrong, where, and what to do.
Every class pickles (DataLoader workers raise them in another process).
"""

from __future__ import annotations


class VlmtuneError(Exception):
    """Base class: a problem with the user's input, reported as `error: <message>` (exit 2)."""


class ConfigError(VlmtuneError, ValueError):
    """A training config, CLI argument or model config.json that cannot run; the message names the key."""


class ParallelError(ConfigError):
    """A parallel layout that cannot work for this model or world size; the message says what would."""


class DataError(VlmtuneError, ValueError):
    """A dataset that cannot be used as a whole (missing file, nothing left to train on, ...)."""


class CheckpointError(VlmtuneError, ValueError):
    """A model or training checkpoint directory that is missing, incomplete or does not fit the model."""
