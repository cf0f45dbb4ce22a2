"""Reading datasets: the messages ("mllm") format and LLaVA conversations, JSON list or JSONL per file.

Every sample is validated here for structure (roles, content, placeholders, media paths); media headers
are checked later when lengths are measured. Samples keep `_file` / `_where` so any later error names them.
A file is read as bytes: a line that is not UTF-8 loses that sample only (`invalid_text`), never the file.
Media paths must stay inside `dataset_dir` unless `restrict_media_to_dataset_dir: false`.
"""

from __future__ import annotations

import codecs
import json
import os
import random
import re

from vlmtune.errors import ConfigError, DataError

from .config import DataConfig, split_list
from .report import BadSample, SkipReport, handle_bad

PLACEHOLDER = re.compile(r"(<image>|<video>)")
LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
MESSAGE_ROLES = ("user", "assistant", "system")


def _as_list(value, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise BadSample(
        "bad_structure", f"'{what}' must be a path or a list of paths, got {type(value).__name__}"
    )


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
    """A sample in either format -> (messages [{role, content}], image paths, video paths), validated.

    Prompts for generation need no assistant turn (`require_assistant=False`)."""
    if not isinstance(sample, dict):
        raise BadSample("bad_structure", f"a sample must be a JSON object, got {type(sample).__name__}")
    check_text(sample)
    sid = f" (id {sample['id']!r})" if "id" in sample else ""
    if "messages" in sample:
        raw, role_key, text_key, roles = sample["messages"], "role", "content", {r: r for r in MESSAGE_ROLES}
        images = _as_list(sample.get("images"), "images")
        videos = _as_list(sample.get("videos"), "videos")
    elif "conversations" in sample:
        raw, role_key, text_key, roles = sample["conversations"], "from", "value", LLAVA_ROLES
        images = _as_list(sample.get("image", sample.get("images")), "image")
        videos = _as_list(sample.get("video", sample.get("videos")), "video")
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


def resolve_media(path: str, dataset_dir: str | None, restrict: bool, kind: str) -> str:
    """Path of a media file named relative to `dataset_dir` (or absolute); checks existence and, with
    `restrict`, that it stays inside `dataset_dir` (symbolic links the user made inside it are followed)."""
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
    """Valid samples of one file (first `max_samples`), each tagged with `_file` and `_where`."""
    samples = []
    for where, rec in read_records(path):
        if max_samples is not None and len(samples) >= max_samples:
            break
        report.read += 1
        try:
            if isinstance(rec, BadSample):
                raise rec
            _, images, videos = to_messages(rec)
            if check_media:
                for p in images:
                    resolve_media(p, cfg.dataset_dir, cfg.restrict_media_to_dataset_dir, "image")
                for p in videos:
                    resolve_media(p, cfg.dataset_dir, cfg.restrict_media_to_dataset_dir, "video")
        except BadSample as e:
            handle_bad(e.located(path, where), cfg.on_bad_sample, report)
            continue
        samples.append({**rec, "_file": path, "_where": where})
    return samples


def locate_dataset(path: str, dataset_dir: str) -> str:
    if os.path.isdir(path):
        raise DataError(f"data.dataset {path!r} is a directory; name the .json / .jsonl files in it")
    if os.path.isfile(path):
        return path
    alt = os.path.join(dataset_dir, path)
    if os.path.isfile(alt):
        return alt
    raise DataError(
        f"dataset file not found: tried {path!r} and {alt!r}; check data.dataset / data.dataset_dir"
    )


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
        raise ConfigError("data.dataset is empty: give one or more comma-separated .json/.jsonl files")
    if not os.path.isdir(cfg.dataset_dir or "."):
        raise DataError(f"data.dataset_dir {cfg.dataset_dir!r} is not a directory")
    report = SkipReport() if report is None else report
    rng = random.Random(seed)
    train: list[dict] = []
    for k, name in enumerate(cfg.dataset):
        part = read_dataset(locate_dataset(name, cfg.dataset_dir), cfg, report, cfg.max_samples)
        if cfg.mix_ratios is not None:
            part = _mix(part, cfg.mix_ratios[k], rng)
        train.extend(part)
    val: list[dict] = []
    for name in split_list(cfg.val_dataset):
        val.extend(read_dataset(locate_dataset(name, cfg.dataset_dir), cfg, report, cfg.max_samples))
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
