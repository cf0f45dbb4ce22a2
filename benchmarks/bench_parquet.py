"""Reading a large Parquet dataset with embedded images: time and peak memory of the sample index and of the
length index, against the same samples as JSONL + image files.

    python benchmarks/bench_parquet.py [--rows 200000] [--measure-rows 20000] [--smoke]

The file holds `--rows` one-image conversations in the messages layout, each image a distinct JPEG
(`--image-side` pixels square; 48: ~0.8 KB, 192: ~7 KB) stored as the hub's `{"bytes", "path"}` struct (no dictionary encoding: the bytes really are in every row),
in row groups of 100 rows (the hub's size for image datasets). Each phase runs in a forked child, so its
peak RSS (`ru_maxrss`) minus the RSS it started with is that phase's own memory:

- index: `load_samples` reads and validates every row (row group by row group) and keeps a reference per
  sample; the JSONL row does the same for the same samples with image paths;
- lengths: `load_samples` then `measure_lengths` over the first `--measure-rows` rows (tokenizer + chat
  template + image headers read from the embedded bytes), one process; rows/s counts the measuring only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vlmtune.data import DataConfig, SkipReport, build_processor, load_samples
from vlmtune.data.lengths import measure_lengths
from vlmtune.testing import make_tiny_checkpoint

ROW_GROUP = 100
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(IMAGE)),
    ]
)


def photo_tiles(side: int, n: int = 64) -> list[bytes]:
    """`n` distinct side x side JPEG crops of the scikit-image photos."""
    import skimage

    root = os.path.join(os.path.dirname(skimage.__file__), "data")
    tiles = []
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"):
        img = Image.open(os.path.join(root, name)).convert("RGB")
        for k in range(n // 4):
            x, y = (k * 37) % (img.width - 96), (k * 53) % (img.height - 96)
            buf = io.BytesIO()
            img.crop((x, y, x + 96, y + 96)).resize((side, side)).save(buf, "JPEG", quality=90)
            tiles.append(buf.getvalue())
    return tiles


def conversation(k: int) -> list[dict]:
    return [
        {
            "role": "user",
            "content": f"<image>\nQuestion {k}: what is in this part of the photo, and where is it?",
        },
        {"role": "assistant", "content": f"Answer {k}: a detail of one of the four photos, near the middle."},
    ]


def write_sets(folder: str, rows: int, tiles: list[bytes]) -> tuple[str, str]:
    """The Parquet file (images embedded) and the JSONL file + image files of the same samples."""
    parquet, jsonl = os.path.join(folder, "train.parquet"), os.path.join(folder, "train.jsonl")
    os.makedirs(os.path.join(folder, "img"))
    for i, t in enumerate(tiles):
        with open(os.path.join(folder, "img", f"{i}.jpg"), "wb") as f:
            f.write(t)
    chunk = 10 * ROW_GROUP
    with pq.ParquetWriter(parquet, SCHEMA, use_dictionary=["id"]) as writer, open(jsonl, "w") as out:
        for start in range(0, rows, chunk):
            batch = []
            for k in range(start, min(rows, start + chunk)):
                name = f"{k % len(tiles)}.jpg"
                # A distinct payload per row: the tile plus the row number in a JPEG comment-free tail.
                data = tiles[k % len(tiles)] + k.to_bytes(4, "little")
                batch.append(
                    {"id": str(k), "messages": conversation(k), "images": [{"bytes": data, "path": name}]}
                )
                out.write(
                    json.dumps({"id": str(k), "messages": conversation(k), "images": [f"img/{name}"]}) + "\n"
                )
            writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA), row_group_size=ROW_GROUP)
    return parquet, jsonl


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def in_child(fn) -> dict:
    """`fn()` in a forked child: its result plus seconds and peak RSS above the child's starting RSS."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        start, t = rss_mb(), time.perf_counter()
        result = fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with os.fdopen(w, "w") as f:
            json.dump({**result, "seconds": time.perf_counter() - t, "peak_mb": peak - start}, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = json.loads(f.read())
    os.waitpid(pid, 0)
    return out


def index(path: str, folder: str) -> dict:
    train, _, report = load_samples(DataConfig(dataset=path, dataset_dir=folder, shuffle=False))
    return {"samples": len(train), "skipped": report.total}


def lengths(path: str, folder: str, processor, n: int) -> dict:
    cfg = DataConfig(dataset=path, dataset_dir=folder, shuffle=False, max_samples=n, num_workers=0)
    train, _, _ = load_samples(cfg)
    t = time.perf_counter()
    out = measure_lengths(cfg, processor, train, SkipReport())
    return {"measured": sum(x is not None for x in out), "per_s": len(out) / (time.perf_counter() - t)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--measure-rows", type=int, default=20_000)
    ap.add_argument("--image-side", type=int, default=48, help="pixels per side of the embedded JPEGs")
    ap.add_argument("--smoke", action="store_true", help="2000 rows, 200 measured: seconds (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.measure_rows = 2000, 200
    with tempfile.TemporaryDirectory() as folder:
        model_dir = os.path.join(folder, "model")
        make_tiny_checkpoint(model_dir, seed=0)
        processor = build_processor(model_dir)  # loaded before the phases: not part of their memory
        t = time.perf_counter()
        parquet, jsonl = write_sets(folder, args.rows, photo_tiles(args.image_side))
        print(
            f"wrote {args.rows} rows in {time.perf_counter() - t:.0f} s: {os.path.getsize(parquet) / 2**20:.0f} MiB "
            f"Parquet (images embedded), {os.path.getsize(jsonl) / 2**20:.0f} MiB JSONL (image paths)",
            file=sys.stderr,
        )
        rows = [
            ("index, Parquet (embedded JPEGs)", in_child(lambda: index(parquet, folder))),
            ("index, JSONL + image files", in_child(lambda: index(jsonl, folder))),
            (f"lengths, first {args.measure_rows} Parquet rows",
             in_child(lambda: lengths(parquet, folder, processor, args.measure_rows))),
        ]  # fmt: skip
    print(
        f"\n{args.rows} rows, {args.image_side}x{args.image_side} JPEGs, {os.cpu_count()} CPUs; peak RSS is each "
        "phase's own (above its starting RSS)\n"
    )
    print(f"{'phase':40} {'samples':>9} {'seconds':>9} {'peak RSS MiB':>13} {'rows/s':>9}")
    for name, r in rows:
        n = r.get("samples", r.get("measured"))
        rate = r.get("per_s", n / r["seconds"])
        print(f"{name:40} {n:>9} {r['seconds']:>9.1f} {r['peak_mb']:>13.0f} {rate:>9.0f}")


if __name__ == "__main__":
    main()
