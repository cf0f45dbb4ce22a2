"""Typed config sections: dataclass fields carrying a default, a one-line help and optional choices, and the
one reader that checks a mapping against them (used by every section of the training config, `data:`
included). Validation errors are `ConfigError`s naming the dotted key. `cli_number` checks numeric
command-line arguments the same way for every command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import field

from vlmtune.errors import ConfigError


def option(default, help: str, choices: tuple | None = None):
    """A dataclass field with a default, a one-line help and optional allowed values."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_type(key: str, value, annotation):
    """`value` coerced to the field's type (`int`, `float`, `str`, `bool`, `list` or a union of them)."""
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in hints:
        return None
    for t in (typing.get_origin(h) or h for h in hints):  # list[str] -> list
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # PyYAML reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is str and isinstance(value, str):
            return value
        if t is list and isinstance(value, list):
            return value
    names = " or ".join("null" if t is type(None) else (typing.get_origin(t) or t).__name__ for t in hints)
    raise ConfigError(f"{key}: expected {names}, got {value!r} ({type(value).__name__})")


def build_section(name: str, cls, raw):
    """An instance of the dataclass `cls` from the mapping `raw` (the section called `name`)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}: unknown key; allowed: {', '.join(fields)}")
        value = check_type(f"{name}.{key}", value, hints[key])
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{name}.{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        kwargs[key] = value
    return cls(**kwargs)


def describe_section(name: str, cls) -> list[str]:
    """`name:` then one line per key: default, allowed values and help (for `--help` listings)."""
    lines = [f"{name}:"]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        choices = f.metadata.get("choices")
        extra = f" [{'|'.join(choices)}]" if choices and len(choices) > 1 else ""
        lines.append(f"  {f.name}: {json.dumps(default)}{extra}  - {f.metadata.get('help', '')}")
    return lines


def cli_number(kind: type = int, *, low: float | None = None, above: float | None = None, high=None):
    """argparse `type=` for a finite number of `kind` with `low <= x` (or `above < x`) and `x <= high`; a bad
    value ends as argparse's `error: argument --name: ...` and exit status 2, like every usage error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        for ok, rule in ((low is None or value >= low, f">= {low}"), (above is None or value > above, f"> {above}"),
                         (high is None or value <= high, f"<= {high}")):  # fmt: skip
            if not ok:
                raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse
