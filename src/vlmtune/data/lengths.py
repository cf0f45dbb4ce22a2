"""Sample lengths in tokens, measured from media headers alone (no pixel is decoded) and cached.

The cache (`cache_dir/length_index.json`) is keyed by the samples, their media files' size / mtime and every
option that changes lengths; a stale or unreadable index is rebuilt. Large sets are measured in a pool of
processes. Bad samples (and those over the micro-batch budget) are counted in the skip report.
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
from .samples import to_messages

log = logging.getLogger("vlmtune.data")


def _cache_key(processor, samples: list[dict], dataset_dir: str | None) -> str:
    h = hashlib.sha256(processor.fingerprint().encode())
    h.update(str(os.path.abspath(dataset_dir or ".")).encode())
    for s in samples:
        h.update(json.dumps(s, sort_keys=True, default=str).encode())
        try:
            _, images, videos = to_messages(s)
        except BadSample:
            continue
        for p in images + videos:
            full = p if os.path.isabs(p) else os.path.join(dataset_dir or ".", p)
            try:
                st = os.stat(full)
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            except (OSError, ValueError):  # ValueError: a NUL character in the path
                h.update(b"missing")
    return h.hexdigest()


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
    from tqdm.auto import tqdm

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
        lengths, bad = [], {}
        args = ((s, cfg.dataset_dir) for s in samples)
        _set_processor(processor)
        parallel = cfg.num_workers > 1 and len(samples) >= 2000
        ctx = multiprocessing.get_context("fork")
        pool = (
            ctx.Pool(cfg.num_workers, initializer=_set_processor, initargs=(processor,)) if parallel else None
        )
        results = pool.imap(_measure_one, args, chunksize=64) if pool else map(_measure_one, args)
        try:
            for i, res in enumerate(
                tqdm(results, total=len(samples), desc="measuring", disable=len(samples) < 2000)
            ):
                if isinstance(res, BadSample):
                    lengths.append(None)
                    bad[str(i)] = [res.reason, res.detail, res.file, res.where]
                else:
                    lengths.append(res)
        finally:
            if pool:
                pool.close()
        if path:
            _write_index(path, {"key": key, "lengths": lengths, "bad": bad})
    out = list(lengths)
    for i in sorted(bad, key=int):
        reason, detail, file, where = bad[i]
        handle_bad(BadSample(reason, detail, file, where), cfg.on_bad_sample, report)
    if max_tokens is not None:
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
    return out


def reasons(report: SkipReport) -> str:
    """'reason: count, ...' of a skip report, for messages."""
    return ", ".join(f"{r}: {n}" for r, n in report.by_reason().items())
