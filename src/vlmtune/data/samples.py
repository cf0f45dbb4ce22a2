"""Reading datasets: the messages ("mllm") format and LLaVA conversations, from JSON list or JSONL files and
from tables (Parquet, `datasets.save_to_disk` directories: `tables.py`).

Every sample is validated here for structure (roles, content, placeholders, media paths); media headers
are checked later when lengths are measured. Samples keep `_file` / `_where` so any later error names them.
A file is read as bytes: a line that is not UTF-8 loses that sample only (`invalid_text`), never the file.
Media are paths or, in tables, `{"bytes", "path"}` items (the hub's `Image` feature) whose bytes are the
file. Media paths must stay inside `dataset_dir` unless `restrict_media_to_dataset_dir: false`.
A table row is kept as a `TableRow` reference and read again when it is used (`to_messages` does that).
"""

from __future__ import annotations

import codecs
import json
import os
import random
import re

from vlmtune.errors import ConfigError, DataError

from .config import DataConfig, split_list
from .media import Embedded
from .report import BadSample, SkipReport, handle_bad
from .tables import TableRow, expand, fetch, is_table, iter_rows

PLACEHOLDER = re.compile(r"(<image>|<video>)")
LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
MESSAGE_ROLES = ("user", "assistant", "system")


def _as_list(value, what: str) -> list:
    """A media field -> its items: paths, or `{"bytes", "path"}` dicts (one, or a list of them)."""
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if isinstance(value, list) and all(isinstance(v, str) or _is_media_item(v) for v in value):
        return list(value)
    raise BadSample(
        "bad_structure",
        f"'{what}' must be a path, a {{bytes, path}} item or a list of them, got {_describe(value)}",
    )


def _is_media_item(value) -> bool:
    """The hub's Image / Video value: `{"bytes": file bytes or None, "path": str or None}`, one of them set."""
    if not isinstance(value, dict) or not set(value) <= {"bytes", "path"}:
        return False
    data, path = value.get("bytes"), value.get("path")
    return (
        isinstance(data, (bytes, bytearray)) or data is None
    ) and (isinstance(path, str) or path is None) and bool(data or path)  # fmt: skip


def _describe(value) -> str:
    if isinstance(value, list):
        bad = next(v for v in value if not (isinstance(v, str) or _is_media_item(v)))
        return f"a list holding {_describe(bad)}"
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)!r:.80} (bytes and path empty or of other types)"
    return type(value).__name__


def check_text(record) -> None:
    """Every string in `record` (keys too) must be encodable text: bytes that were not UTF-8 (read as lone
    surrogates) or a `"\\ud800"` escape would crash the tokenizer or the log, so the sample is refused."""
    stack = [record]
    while stack:  # iterative: a deeply nested record must not exhaust the recursion limit
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise BadSample(
                    "invalid_text", f"text that is not valid UTF-8 at character {e.start} of {value!r:.80}"
                ) from None
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def to_messages(sample: dict, require_assistant: bool = True) -> tuple[list[dict], list[str], list[str]]:
    """A sample in either format -> (messages [{role, content}], images, videos), validated; media are paths
    or `{"bytes", "path"}` items. A `TableRow` is read from its table first.

    Prompts for generation need no assistant turn (`require_assistant=False`)."""
    if isinstance(sample, TableRow):
        sample = fetch(sample)
    if not isinstance(sample, dict):
        raise BadSample("bad_structure", f"a sample must be a JSON object, got {type(sample).__name__}")
    check_text(sample)
    sid = f" (id {sample['id']!r})" if "id" in sample else ""
    # A table has every column in every row: a column of the other layout is None there.
    if sample.get("messages") is not None or "conversations" not in sample and "messages" in sample:
        raw, role_key, text_key, roles = sample["messages"], "role", "content", {r: r for r in MESSAGE_ROLES}
        images = _as_list(sample.get("images"), "images")
        videos = _as_list(sample.get("videos"), "videos")
    elif "conversations" in sample:
        raw, role_key, text_key, roles = sample["conversations"], "from", "value", LLAVA_ROLES
        images = _as_list(_first(sample, "image", "images"), "image")
        videos = _as_list(_first(sample, "video", "videos"), "video")
    else:
        raise BadSample("bad_structure", f"sample{sid} has neither 'messages' nor 'conversations'")
    if not isinstance(raw, list) or not raw:
        raise BadSample("bad_structure", f"sample{sid}: the conversation must be a non-empty list")
    messages = []
    for k, turn in enumerate(raw):
        if not isinstance(turn, dict) or role_key not in turn:
            raise BadSample("bad_structure", f"sample{sid} turn {k}: needs a '{role_key}' key")
        role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise BadSample(
                "unknown_role",
                f"sample{sid} turn {k}: role {turn[role_key]!r}; expected one of {sorted(roles)}",
            )
        content = turn.get(text_key)
        if not isinstance(content, str):
            raise BadSample("bad_structure", f"sample{sid} turn {k}: '{text_key}' must be a string")
        if not content.strip():
            raise BadSample("empty_content", f"sample{sid} turn {k} ({role}) has empty content")
        if role == "system" and k != 0:
            raise BadSample("bad_structure", f"sample{sid} turn {k}: a system message must come first")
        messages.append({"role": role, "content": content})
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise BadSample("no_assistant_turn", f"sample{sid} has no assistant turn")
    text = "".join(m["content"] for m in messages)
    for tag, paths in (("<image>", images), ("<video>", videos)):
        if text.count(tag) != len(paths):
            raise BadSample(
                "placeholder_mismatch",
                f"sample{sid} has {text.count(tag)} {tag} placeholder(s) but {len(paths)} file(s)",
            )
    return messages, images, videos


def _first(sample: dict, *keys):
    """The first of `keys` the sample holds a value for (LLaVA files say `image` or `images`)."""
    return next((sample[k] for k in keys if sample.get(k) is not None), None)


def resolve_media(item, dataset_dir: str | None, restrict: bool, kind: str) -> str | Embedded:
    """What to read a media item from: its bytes (`Embedded`), or the path of a file named relative to
    `dataset_dir` (or absolute), checked to exist and, with `restrict`, to stay inside `dataset_dir` (symbolic
    links the user made inside it are followed). A `{"bytes": None, "path": p}` item is the path p."""
    if isinstance(item, dict):
        if item.get("bytes"):
            return Embedded(bytes(item["bytes"]), item.get("path") or "", kind)
        item = item["path"]
    path = item
    if "\x00" in path:
        raise BadSample("invalid_text", f"{kind} path {path!r} contains a NUL character")
    base = dataset_dir or "."
    full = path if os.path.isabs(path) else os.path.join(base, path)
    if restrict and not _inside(full, base):
        raise BadSample(
            "media_outside_dataset_dir",
            f"{kind} path {path!r} leads outside dataset_dir {os.path.abspath(base)}; keep media under "
            "data.dataset_dir, or set data.restrict_media_to_dataset_dir: false if you trust this dataset",
        )
    if not os.path.isfile(full):
        raise BadSample(
            f"missing_{kind}", f"{kind} file not found: {full} (from {path!r}, dataset_dir {base!r})"
        )
    return full


def _inside(full: str, base: str) -> bool:
    """`full` lies under `base`, as written (`..` resolved, links not) or once links are resolved."""
    for norm in (os.path.abspath, os.path.realpath):
        root = norm(base)
        if os.path.commonpath([root, norm(full)]) == root:
            return True
    return False


def read_records(path: str) -> list[tuple[str, object]]:
    """(where, record) pairs of a JSON list or JSONL file (detected from its first character after an
    optional UTF-8 byte-order mark). A JSONL line that does not parse is a `BadSample` in the list; bytes
    that are not UTF-8 become lone surrogates, which `check_text` refuses for that sample only."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except (OSError, ValueError) as e:  # ValueError: a NUL character in the path
        raise DataError(
            f"{path!r}: cannot read the dataset file ({getattr(e, 'strerror', None) or e})"
        ) from None
    text = raw.removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="surrogateescape")
    if text.lstrip()[:1] == "[":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:  # a broken list cannot be partly read
            line = getattr(e, "lineno", 1)
            raise BadSample(
                "malformed_json",
                _json_problem(e) + "; the whole JSON list is unreadable",
                path,
                f"line {line}",
            ) from None
        return [(f"index {i}", rec) for i, rec in enumerate(data)]
    out = []
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            out.append((f"line {n}", json.loads(line)))
        except (json.JSONDecodeError, RecursionError) as e:
            out.append((f"line {n}", BadSample("malformed_json", _json_problem(e), path, f"line {n}")))
    return out


def _json_problem(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "JSON nested too deeply"
    return f"{e.msg} at column {e.colno}"


def read_dataset(
    path: str, cfg: DataConfig, report: SkipReport, max_samples: int | None = None, check_media: bool = True
) -> list[dict]:
    """Valid samples of one file or table (first `max_samples`), each tagged with `_file` and `_where`; a
    table's rows are kept as `TableRow` references."""
    table = is_table(path)
    records = ((f"row {n}", rec) for n, rec in iter_rows(path)) if table else read_records(path)
    samples = []
    for where, rec in records:
        if max_samples is not None and len(samples) >= max_samples:
            break
        report.read += 1
        try:
            if isinstance(rec, BadSample):
                raise rec
            _, images, videos = to_messages(rec)
            paths = [m for m in images + videos if isinstance(resolve_path(m), str)]
            if check_media:
                for kind, items in (("image", images), ("video", videos)):
                    for m in items:
                        resolve_media(m, cfg.dataset_dir, cfg.restrict_media_to_dataset_dir, kind)
        except BadSample as e:
            handle_bad(e.located(path, where), cfg.on_bad_sample, report)
            continue
        if table:
            ref = TableRow(_file=path, _where=where, _row=int(where[4:]))
            if paths:
                ref["_media"] = [resolve_path(m) for m in paths]
            samples.append(ref)
        else:
            samples.append({**rec, "_file": path, "_where": where})
    return samples


def resolve_path(item) -> str | None:
    """The path a media item names when it is not embedded (None for embedded bytes)."""
    if isinstance(item, str):
        return item
    return None if item.get("bytes") else item.get("path")


def read_entry(name: str, cfg: DataConfig, report: SkipReport) -> list[dict]:
    """Samples of one `data.dataset` entry: a file, a glob or a directory of shards (`max_samples` counts
    over all of them), or a `save_to_disk` directory."""
    samples: list[dict] = []
    for path in expand(name, cfg.dataset_dir):
        left = None if cfg.max_samples is None else cfg.max_samples - len(samples)
        if left == 0:
            break
        samples.extend(read_dataset(path, cfg, report, left))
    return samples


def _mix(samples: list[dict], ratio: float, rng: random.Random) -> list[dict]:
    """Keep round(ratio * n) samples: whole repeats plus a seeded subset for the fraction."""
    want = round(ratio * len(samples))
    out = samples * (want // len(samples)) if samples else []
    rest = want - len(out)
    return out + rng.sample(samples, rest) if rest else out


def load_samples(
    cfg: DataConfig, seed: int = 42, report: SkipReport | None = None
) -> tuple[list[dict], list[dict], SkipReport]:
    """(train, validation, skip report) for a DataConfig; shuffling, mixing and the validation split are
    deterministic from `seed` (the run's `train.seed`). Skips are added to `report` when given."""
    if not cfg.dataset:
        raise ConfigError(
            "data.dataset is empty: give one or more comma-separated .json / .jsonl / .parquet files, globs or "
            "directories"
        )
    if not os.path.isdir(cfg.dataset_dir or "."):
        raise DataError(f"data.dataset_dir {cfg.dataset_dir!r} is not a directory")
    report = SkipReport() if report is None else report
    rng = random.Random(seed)
    train: list[dict] = []
    for k, name in enumerate(cfg.dataset):
        part = read_entry(name, cfg, report)
        if cfg.mix_ratios is not None:
            part = _mix(part, cfg.mix_ratios[k], rng)
        train.extend(part)
    val: list[dict] = []
    for name in split_list(cfg.val_dataset):
        val.extend(read_entry(name, cfg, report))
    if cfg.shuffle:
        rng.shuffle(train)
    if cfg.val_ratio > 0:
        n_val = max(1, round(cfg.val_ratio * len(train)))
        order = list(range(len(train)))
        rng.shuffle(order)
        held = set(order[:n_val])
        val.extend(s for i, s in enumerate(train) if i in held)
        train = [s for i, s in enumerate(train) if i not in held]
    return train, val, report


def sample_id(sample: dict) -> str:
    if "id" in sample:
        return str(sample["id"])
    return f"{sample.get('_file', '?')}:{sample.get('_where', '?')}"
