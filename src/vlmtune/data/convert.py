"""LLaVA-Instruct conversations -> the messages format: JSON / JSONL with image paths relative to the
dataset_dir, or one self-contained Parquet file with the images embedded."""

from __future__ import annotations

import json
import os
from collections import Counter

from tqdm.auto import tqdm

from vlmtune.errors import DataError

from .samples import LLAVA_ROLES, read_records
from .tables import PARQUET

PARQUET_ROW_GROUP = 64  # rows per row group: random access during training decodes one group per sample


def convert_llava(input_path: str, image_dir: str, output_path: str, dataset_dir: str | None = None) -> dict:
    """Write `output_path` (JSON list; JSONL if it ends in .jsonl; Parquet with embedded images if it ends in
    .parquet); returns a summary dict.

    JSON image paths are written relative to `dataset_dir`, which is what `data.dataset_dir` must be set to
    (default: the output file's directory when the images are under it, else `image_dir`, so that no path
    leads outside it: training refuses such paths unless `data.restrict_media_to_dataset_dir: false`).
    Parquet rows hold each image's bytes with its path relative to `image_dir` (`{"bytes", "path"}`, the
    hub's Image layout), so the file needs no dataset_dir. Samples whose image is missing are skipped and
    counted; an unknown role stops the conversion naming the sample.
    """
    parquet = output_path.endswith(PARQUET)
    out_dir, images_root = os.path.dirname(os.path.abspath(output_path)), os.path.abspath(image_dir)
    inside = os.path.commonpath([out_dir, images_root]) == out_dir
    dataset_dir = os.path.abspath(
        images_root if parquet else dataset_dir or (out_dir if inside else images_root)
    )
    records = read_records(input_path)
    counts: Counter = Counter()
    out = []
    for where, rec in tqdm(records, desc="converting", disable=len(records) < 1000):
        sample = _convert_one(input_path, where, rec, image_dir, dataset_dir, counts)
        if sample is not None:
            out.append(sample)
    os.makedirs(out_dir, exist_ok=True)
    if parquet:
        _write_parquet(out, dataset_dir, output_path)
    else:
        _write_json(out, output_path)
    return {
        "input": len(records),
        "written": len(out),
        "with_images": counts["with_images"],
        "text_only": counts["text_only"],
        "skipped_missing_image": counts["skipped_missing_image"],
        "outside_dataset_dir": counts["outside_dataset_dir"],
        "output": output_path,
        "dataset_dir": None if parquet else dataset_dir,
    }


def _convert_one(input_path, where, rec, image_dir, dataset_dir, counts) -> dict | None:
    """One LLaVA record -> a messages-format sample (None: an image is missing, counted)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
        raise DataError(f"{input_path}, {where}: expected an object with a 'conversations' list")
    sid = rec.get("id", where)
    messages = []
    for k, turn in enumerate(rec["conversations"]):
        role = LLAVA_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None:
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise DataError(
                f"{input_path}, {where}: sample id {sid!r} turn {k} has unknown role {got!r}; "
                f"expected one of {sorted(LLAVA_ROLES)}"
            )
        messages.append({"role": role, "content": turn.get("value", "")})
    images = rec.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else list(images)
    paths = []
    for name in images:
        full = name if os.path.isabs(name) else os.path.join(image_dir, name)
        if not os.path.isfile(full):
            counts["skipped_missing_image"] += 1
            return None
        paths.append(os.path.relpath(os.path.abspath(full), dataset_dir))
        counts["outside_dataset_dir"] += paths[-1].split(os.sep)[0] == os.pardir
    sample = {"id": sid, "messages": messages}
    if paths:
        sample["images"] = paths
        counts["with_images"] += 1
    else:
        counts["text_only"] += 1
    return sample


def _write_json(samples: list[dict], output_path: str) -> None:
    with open(output_path, "w", encoding="utf-8") as f:
        if output_path.endswith(".jsonl"):
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
        else:
            json.dump(samples, f, ensure_ascii=False, indent=1)


def _write_parquet(samples: list[dict], image_root: str, output_path: str) -> None:
    """Rows `{id, messages, images: [{bytes, path}]}`, written a row group at a time (memory: one group's
    images), to a temporary name first: a reader never sees half a file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("id", pa.string()), ("messages", pa.list_(turn)), ("images", pa.list_(image))])
    tmp = output_path + ".tmp"
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, max(1, len(samples)), PARQUET_ROW_GROUP):
            rows = [
                {
                    "id": str(s["id"]),
                    "messages": s["messages"],
                    "images": [
                        {"bytes": _read_bytes(os.path.join(image_root, p)), "path": p}
                        for p in s.get("images", [])
                    ],
                }
                for s in samples[start : start + PARQUET_ROW_GROUP]
            ]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=PARQUET_ROW_GROUP)
    os.replace(tmp, output_path)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
