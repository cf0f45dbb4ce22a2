"""Config dataclass fields that carry their help text (for `--help` listings and validation messages)."""

from __future__ import annotations

from dataclasses import field


def option(default, help: str, choices: tuple | None = None):
    """A dataclass field with a default, a one-line help and optional allowed values."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)
