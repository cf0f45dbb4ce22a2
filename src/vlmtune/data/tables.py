"""Datasets stored as tables: Parquet files (one, a glob, or a directory of shards) and directories written by
`datasets.Dataset.save_to_disk`, read lazily with pyarrow.

A table row becomes a `TableRow`: the file and the row number, nothing else (plus the row's media paths when
it names files instead of embedding them, for the length index's cache key). The row's columns, embedded
image bytes included, are read again when the sample is measured or encoded (`fetch`), so neither the
training process nor a DataLoader worker ever holds the dataset's bytes, and a sample pickles in a few bytes.

Reading is by Parquet row group (or Arrow record batch): the read pass (`iter_rows`) walks them one at a time;
random access (`fetch`) keeps the last few decoded row groups per process (`ROW_GROUP_CACHE_BYTES`). A
`save_to_disk` directory's Arrow files are memory-mapped, so a row costs no read at all.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
from collections import OrderedDict
from collections.abc import Iterator

from vlmtune.errors import DataError

PARQUET = ".parquet"
GLOB_CHARS = "*?["
ROW_GROUP_CACHE_BYTES = 256 * 2**20  # decoded row groups kept per process for random access


class TableRow(dict):
    """A sample stored in a table: `_file` (a Parquet file or a `save_to_disk` directory), `_where`
    ('row N', counted from 0 as `datasets` and pandas count) and `_row` (N); `_media` lists the row's media
    paths when it names files. `fetch` returns the row itself."""

    __slots__ = ()


def is_table(path: str) -> bool:
    """A Parquet file or a `save_to_disk` directory (read by this module), not a JSON / JSONL file."""
    return path.endswith(PARQUET) or os.path.isdir(path)


# ---------------------------------------------------------------------------------------------- locating


def expand(name: str, dataset_dir: str) -> list[str]:
    """The files one `data.dataset` entry names: itself; a glob's matches; a directory's Parquet shards; or a
    `save_to_disk` directory (one entry). A relative name that does not exist is tried under `dataset_dir`."""
    candidates = [name] if os.path.isabs(name) else [name, os.path.join(dataset_dir, name)]
    if any(c in name for c in GLOB_CHARS):
        for pattern in candidates:
            found = sorted(glob.glob(pattern))
            if found:
                return [f for f in found if not os.path.isdir(f) or _is_saved_dataset(f)]
        raise DataError(
            f"data.dataset {name!r}: no file matches (tried {' and '.join(map(repr, candidates))})"
        )
    for path in candidates:
        if os.path.isdir(path):
            return _directory(path)
        if os.path.isfile(path):
            return [path]
    raise DataError(
        f"dataset file not found: tried {' and '.join(map(repr, candidates))}; check data.dataset / "
        "data.dataset_dir"
    )


def _directory(path: str) -> list[str]:
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        splits = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        raise DataError(
            f"data.dataset {path!r} is a datasets DatasetDict; name one split directory, e.g. "
            f"{os.path.join(path, splits[0] if splits else 'train')!r}"
        )
    if _is_saved_dataset(path):
        return [path]
    shards = sorted(glob.glob(os.path.join(path, "*" + PARQUET)))
    if not shards:
        raise DataError(
            f"data.dataset {path!r} is a directory without .parquet files or a datasets.save_to_disk dataset "
            "(state.json); name .json / .jsonl / .parquet files, a glob, or such a directory"
        )
    return shards


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json"))


# ---------------------------------------------------------------------------------------------- reading


def iter_rows(path: str) -> Iterator[tuple[int, dict]]:
    """(row number, row as Python values) of a table, one row group at a time (memory: one row group)."""
    row = 0
    for batch in _batches(path):
        for record in batch.to_pylist():
            yield row, record
            row += 1


def _batches(path: str):
    import pyarrow as pa

    try:
        if not os.path.isdir(path):
            pf = _parquet_file(path)
            for i in range(pf.metadata.num_row_groups):
                yield pf.read_row_group(i)
            return
        for file in _arrow_files(path):
            with pa.OSFile(file) as f:  # sequential, not memory-mapped: the read pass holds one batch
                yield from pa.ipc.open_stream(f)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read the table ({e})") from None


def _parquet_file(path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def _arrow_files(path: str) -> list[str]:
    """The Arrow files of a `save_to_disk` directory, in the order its state.json lists them."""
    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            names = [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}/state.json: not a datasets.save_to_disk state file ({e})") from None
    return [os.path.join(path, n) for n in names]


# ---------------------------------------------------------------------------------------------- random access


class _Parquet:
    def __init__(self, path: str):
        self.path, self.file = path, _parquet_file(path)
        meta = self.file.metadata
        self.starts = [0]
        for i in range(meta.num_row_groups):
            self.starts.append(self.starts[-1] + meta.row_group(i).num_rows)

    def row(self, n: int) -> dict:
        group = bisect.bisect_right(self.starts, n) - 1
        if not 0 <= n < self.starts[-1]:
            raise DataError(
                f"{self.path}: row {n} is past its {self.starts[-1]} rows; was the file replaced?"
            )
        table = _ROW_GROUPS.get((self.path, group))
        if table is None:
            table = self.file.read_row_group(group)
            _ROW_GROUPS.put((self.path, group), table)
        return table.slice(n - self.starts[group], 1).to_pylist()[0]


class _SavedDataset:
    def __init__(self, path: str):
        import pyarrow as pa

        self.path = path
        batches = []
        for file in _arrow_files(path):  # memory-mapped: pages are read when a row is touched
            batches.extend(pa.ipc.open_stream(pa.memory_map(file)).read_all().to_batches())
        self.table = pa.Table.from_batches(batches) if batches else None

    def row(self, n: int) -> dict:
        if self.table is None or not 0 <= n < self.table.num_rows:
            raise DataError(f"{self.path}: row {n} is past its rows; was the dataset saved again?")
        return self.table.slice(n, 1).to_pylist()[0]


class _RowGroupCache:
    """Decoded row groups by (file, group), least recently used dropped past `ROW_GROUP_CACHE_BYTES`."""

    def __init__(self):
        self.tables: OrderedDict = OrderedDict()

    def get(self, key):
        table = self.tables.get(key)
        if table is not None:
            self.tables.move_to_end(key)
        return table

    def put(self, key, table) -> None:
        self.tables[key] = table
        while len(self.tables) > 1 and sum(t.nbytes for t in self.tables.values()) > ROW_GROUP_CACHE_BYTES:
            self.tables.popitem(last=False)

    def clear(self) -> None:
        self.tables.clear()


_OPEN: dict[str, _Parquet | _SavedDataset] = {}
_ROW_GROUPS = _RowGroupCache()


def _forget_open_files() -> None:
    _OPEN.clear()
    _ROW_GROUPS.clear()


# A forked DataLoader worker opens its own handles (pyarrow readers are not meant to cross a fork).
os.register_at_fork(after_in_child=_forget_open_files)


def fetch(sample: TableRow) -> dict:
    """The row a `TableRow` points at, as Python values (images as `{"bytes", "path"}` dicts), with the
    sample's `_file` / `_where` kept so that a problem found later names the file and row."""
    path = sample["_file"]
    source = _OPEN.get(path)
    if source is None:
        try:
            source = _OPEN[path] = _SavedDataset(path) if os.path.isdir(path) else _Parquet(path)
        except OSError as e:
            raise DataError(f"{path}: cannot read the table ({e})") from None
    row = source.row(sample["_row"])
    return {**row, "_file": path, "_where": sample["_where"]}


def fetch_all(samples: list[dict]) -> list[dict]:
    """`fetch` for every `TableRow` of `samples` (others unchanged), read in file and row order so that the
    rows of one row group are decoded once; returned in the given order."""
    out = list(samples)
    order = sorted(
        (i for i, s in enumerate(samples) if isinstance(s, TableRow)),
        key=lambda i: (samples[i]["_file"], samples[i]["_row"]),
    )
    for i in order:
        out[i] = fetch(samples[i])
    return out


def storage_order(samples: list[dict]) -> list[int]:
    """Indices of `samples` with table rows in file and row order (measuring them so reads each row group
    once); other samples keep their place at the front."""
    return sorted(
        range(len(samples)),
        key=lambda i: (
            (1, samples[i]["_file"], samples[i]["_row"]) if isinstance(samples[i], TableRow) else (0, "", i)
        ),
    )
