"""Sample lengths in tokens, measured from media headers alone (no pixel is decoded) and cached.

The cache (`cache_dir/length_index.json`) is keyed by the samples, their media files' size / mtime (a
table's own size / mtime for the rows it holds) and every option that changes lengths; a stale or
unreadable index is rebuilt. Large sets are measured in a pool of processes, table rows in file order (each
row group is read once). Bad samples (and those over the micro-batch budget) are counted in the skip report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os

from vlmtune.errors import ConfigError

from .config import DataConfig
from .report import BadSample, SkipReport, handle_bad
from .samples import resolve_path, to_messages
from .tables import TableRow, storage_order

log = logging.getLogger("vlmtune.data")


def _cache_key(processor, samples: list[dict], dataset_dir: str | None) -> str:
    h = hashlib.sha256(processor.fingerprint().encode())
    h.update(str(os.path.abspath(dataset_dir or ".")).encode())
    tables = set()
    for s in samples:
        h.update(json.dumps(s, sort_keys=True, default=_digest).encode())
        if isinstance(s, TableRow):  # the row is not read here: its table's stat, and any paths it names
            tables.add(s["_file"])
            paths = s.get("_media", [])
        else:
            try:
                _, images, videos = to_messages(s)
            except BadSample:
                continue
            paths = [p for p in map(resolve_path, images + videos) if p is not None]
        for p in paths:
            h.update(_stat(p if os.path.isabs(p) else os.path.join(dataset_dir or ".", p)))
    for table in sorted(tables):
        h.update(_stat(table))
    return h.hexdigest()


def _stat(path: str) -> bytes:
    try:
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}".encode()
    except (OSError, ValueError):  # ValueError: a NUL character in the path
        return b"missing"


def _digest(value) -> str:
    """Embedded media bytes in a sample given in memory enter the key as their hash."""
    if isinstance(value, (bytes, bytearray)):
        return hashlib.sha256(value).hexdigest()
    return str(value)


_WORKER_PROCESSOR = None  # set once per measuring process (forked: not pickled per task)


def _set_processor(processor) -> None:
    global _WORKER_PROCESSOR
    _WORKER_PROCESSOR = processor


def _measure_one(args) -> int | BadSample:
    sample, dataset_dir = args
    try:
        return _WORKER_PROCESSOR.measure(sample, dataset_dir)[0]
    except BadSample as e:
        return e


def _write_index(path: str, index: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(index, f)
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"data.cache_dir: cannot write the length index {path} ({e})") from None


def measure_lengths(
    cfg: DataConfig, processor, samples: list[dict], report: SkipReport, max_tokens: int | None = None
) -> list[int | None]:
    """Token length per sample (None: a bad sample, logged and counted in `report`); cached under cache_dir."""
    key = _cache_key(processor, samples, cfg.dataset_dir)
    path = os.path.join(cfg.cache_dir, "length_index.json") if cfg.cache_dir else None
    cached = None
    if path and os.path.exists(path):
        try:
            with open(path) as f:
                cached = json.load(f)
        except (OSError, ValueError):
            cached = {}
        if not isinstance(cached, dict) or cached.get("key") != key:
            log.info("length index %s is stale or unreadable; rebuilding it", path)
            cached = None
    if cached is not None:
        lengths, bad = cached["lengths"], cached["bad"]
    else:
        lengths, bad = _measure_all(cfg, processor, samples)
        if path:
            _write_index(path, {"key": key, "lengths": lengths, "bad": bad})
    out = list(lengths)
    for i in sorted(bad, key=int):
        reason, detail, file, where = bad[i]
        handle_bad(BadSample(reason, detail, file, where), cfg.on_bad_sample, report)
    if max_tokens is not None:
        _drop_over_budget(cfg, samples, out, max_tokens, report)
    return out


def _measure_all(cfg: DataConfig, processor, samples: list[dict]) -> tuple[list, dict]:
    """(length or None per sample, {index: bad sample's fields}), measured in storage order."""
    from tqdm.auto import tqdm

    order = storage_order(samples)
    lengths: list = [None] * len(samples)
    bad: dict = {}
    args = ((samples[i], cfg.dataset_dir) for i in order)
    _set_processor(processor)
    parallel = cfg.num_workers > 1 and len(samples) >= 2000
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(cfg.num_workers, initializer=_set_processor, initargs=(processor,)) if parallel else None
    results = pool.imap(_measure_one, args, chunksize=64) if pool else map(_measure_one, args)
    try:
        bar = tqdm(results, total=len(samples), desc="measuring", disable=len(samples) < 2000)
        for i, res in zip(order, bar):
            if isinstance(res, BadSample):
                bad[str(i)] = [res.reason, res.detail, res.file, res.where]
            else:
                lengths[i] = res
    finally:
        if pool:
            pool.close()
    return lengths, bad


def _drop_over_budget(cfg: DataConfig, samples: list[dict], out: list, max_tokens: int, report) -> None:
    for i, n in enumerate(out):
        if n is not None and n > max_tokens:
            s = samples[i]
            why = (
                f"{n} tokens > the micro-batch budget of {max_tokens} (train.micro_batch_tokens); raise "
                "it, or lower data.cutoff_len / data.image_max_pixels"
            )
            err = BadSample("over_long", why, s.get("_file"), s.get("_where"))
            handle_bad(err, cfg.on_bad_sample, report)
            out[i] = None


def reasons(report: SkipReport) -> str:
    """'reason: count, ...' of a skip report, for messages."""
    return ", ".join(f"{r}: {n}" for r, n in report.by_reason().items())
