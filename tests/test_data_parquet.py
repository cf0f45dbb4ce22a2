"""Datasets stored as tables: Parquet (one file, shards by glob or directory) and `datasets.save_to_disk`
directories, with the real photos embedded as PNG / JPEG bytes, encode exactly like the JSON + image files
version of the same samples; the loader (packing, sharding, resume, workers), max_samples, mix_ratios, the
length index and the bad-sample policy work the same, and a skip names the file and the row."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vlmtune.cli import main
from vlmtune.data import DataConfig, build_loader, build_processor, load_samples
from vlmtune.data.tables import TableRow, fetch
from vlmtune.errors import DataError

TURN = pa.struct([("role", pa.string()), ("content", pa.string())])
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the hub's Image feature
MESSAGES = pa.schema([("id", pa.string()), ("messages", pa.list_(TURN)), ("images", pa.list_(IMAGE))])


@pytest.fixture(scope="module")
def photos(photo_paths, tmp_path_factory) -> str:
    """A dataset directory with small PNG and JPEG copies of the real photos under img/."""
    root = tmp_path_factory.mktemp("photos")
    (root / "img").mkdir()
    for name, fmt in (("astronaut", "png"), ("rocket", "jpg"), ("chelsea", "jpg"), ("coffee", "png")):
        img = Image.open(photo_paths[name]).convert("RGB")
        img.thumbnail((112, 112))
        img.save(root / "img" / f"{name}.{fmt}")
    return str(root)


def conversation(k: int) -> dict:
    """Sample k of a set that has every kind: one PNG, one JPEG, two images, text only, system + two turns."""
    kind = k % 5
    ask = [
        {"role": "user", "content": f"<image>What is in picture {k}?"},
        {"role": "assistant", "content": f"Thing {k}."},
    ]
    if kind == 0:
        return {"id": str(k), "messages": ask, "images": ["img/astronaut.png"]}
    if kind == 1:
        return {"id": str(k), "messages": ask, "images": ["img/rocket.jpg"]}
    if kind == 2:
        two = [
            {"role": "user", "content": "<image>and<image> differ how?"},
            {"role": "assistant", "content": "Colour."},
        ]
        return {"id": str(k), "messages": two, "images": ["img/chelsea.jpg", "img/coffee.png"]}
    if kind == 3:
        return {
            "id": str(k),
            "messages": [
                {"role": "user", "content": f"Count to {k}."},
                {"role": "assistant", "content": "1 2 3"},
            ],
            "images": [],
        }
    turns = [
        {"role": "system", "content": "Be terse."},
        *ask,
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes."},
    ]
    return {"id": str(k), "messages": turns, "images": ["img/coffee.png"]}  # fmt: skip


def embedded(sample: dict, root: str) -> dict:
    """The same sample with its images as `{"bytes", "path"}` items holding the files' bytes."""
    items = [
        {"bytes": open(os.path.join(root, p), "rb").read(), "path": os.path.basename(p)}
        for p in sample["images"]
    ]
    return {**sample, "images": items}


def write_parquet(path: str, rows: list[dict], row_group_size: int = 4) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=MESSAGES), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def sets(photos, tmp_path_factory) -> dict:
    """The same 15 samples as JSONL + files, one Parquet file, two shards (and a directory of them)."""
    out = tmp_path_factory.mktemp("sets")
    samples = [conversation(k) for k in range(15)]
    jsonl = out / "train.jsonl"
    jsonl.write_text("".join(json.dumps(s) + "\n" for s in samples))
    rows = [embedded(s, photos) for s in samples]
    shards = out / "shards"
    shards.mkdir()
    write_parquet(str(shards / "part-0.parquet"), rows[:7])
    write_parquet(str(shards / "part-1.parquet"), rows[7:])
    return {"json": str(jsonl), "parquet": write_parquet(str(out / "train.parquet"), rows),
            "glob": str(shards / "part-*.parquet"), "dir": str(shards), "rows": rows}  # fmt: skip


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return build_processor(tiny_ckpt[0], image_min_pixels=4096, image_max_pixels=16384)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def read(dataset: str, root: str, **kw):
    return load_samples(DataConfig(dataset=dataset, dataset_dir=root, shuffle=False, **kw))


def test_parquet_with_embedded_photos_encodes_like_json_and_files(sets, photos, processor):
    from_json, _, _ = read(sets["json"], photos)
    from_table, _, report = read(sets["parquet"], photos)
    assert len(from_json) == len(from_table) == 15 and report.total == 0
    assert isinstance(from_table[0], TableRow) and from_table[3]["_where"] == "row 3"
    for a, b in zip(from_json, from_table):
        assert_same_tensors(processor.encode(a, photos), processor.encode(b, photos))
        assert processor.measure(a, photos) == processor.measure(b, photos)
    # A row exactly as pyarrow reads it (images as {bytes, path} dicts), no dataset_dir needed.
    for k, row in enumerate(pq.read_table(sets["parquet"]).to_pylist()[:5]):
        assert_same_tensors(processor.encode(row), processor.encode(from_json[k], photos))
    # A sample in memory is the file name and the row number, not the row's image bytes.
    assert len(pickle.dumps(from_table[2])) < 200 < len(sets["rows"][2]["images"][0]["bytes"])


def batches(loader, n=None) -> list:
    out = []
    for batch in loader:
        out.append((batch.input_ids, batch.pixel_values, batch.image_grid_thw))
        if n is not None and len(out) == n:
            break
    return out


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            assert (s is None and t is None) or torch.equal(s, t)


def loader_for(dataset, photos, processor, *, workers=0, rank=0, seed=7):
    cfg = DataConfig(dataset=dataset, dataset_dir=photos, num_workers=workers)
    train, _, report = load_samples(cfg, seed=seed)
    return build_loader(
        cfg, processor, samples=train, max_tokens=80, seed=seed, dp_rank=rank, dp_size=2, report=report
    )


def test_loader_over_shards_and_workers_equals_json(sets, photos, processor):
    for rank in (0, 1):
        want = batches(loader_for(sets["json"], photos, processor, rank=rank))
        for name in ("glob", "dir"):
            loader = loader_for(sets[name], photos, processor, workers=2, rank=rank)
            assert_same_batches(batches(loader), want)
    # Exact resume in the middle of an epoch, from a table.
    loader = loader_for(sets["parquet"], photos, processor)
    assert len(loader) >= 3
    first = batches(loader, 2)
    state = loader.state_dict()
    resumed = loader_for(sets["parquet"], photos, processor)
    resumed.load_state_dict(state)
    assert_same_batches(first + batches(resumed), batches(loader_for(sets["json"], photos, processor)))


def test_max_samples_and_mix_ratios_count_rows_like_lines(sets, photos):
    for kw in ({"max_samples": 9}, {"mix_ratios": [1.5, 0.5]}):
        two = ",".join([sets["json"], sets["json"]]) if "mix_ratios" in kw else sets["json"]
        tables = ",".join([sets["glob"], sets["dir"]]) if "mix_ratios" in kw else sets["glob"]
        a, _, ra = read(two, photos, **kw)
        b, _, rb = read(tables, photos, **kw)
        assert [s["id"] for s in a] == [fetch(s)["id"] for s in b] and ra.read == rb.read


def test_saved_datasets_directory_loads(sets, photos, processor, tmp_path):
    import datasets

    features = datasets.Features(
        {"id": datasets.Value("string"), "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
         "images": datasets.Sequence(datasets.Image())}
    )  # fmt: skip
    ds = datasets.Dataset.from_list(sets["rows"], features=features)
    ds.save_to_disk(str(tmp_path / "saved"), max_shard_size="20KB")  # several Arrow files
    assert len([f for f in os.listdir(tmp_path / "saved") if f.endswith(".arrow")]) > 1
    from_json, _, _ = read(sets["json"], photos)
    from_saved, _, _ = read(str(tmp_path / "saved"), photos)
    assert [s["_where"] for s in from_saved] == [f"row {k}" for k in range(15)]
    for a, b in zip(from_json, from_saved):
        assert_same_tensors(processor.encode(a, photos), processor.encode(b, photos))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match="DatasetDict; name one split directory, e.g. .*dict/train"):
        read(str(tmp_path / "dict"), photos)


def test_bad_rows_are_skipped_with_file_and_row(sets, photos, processor, tmp_path):
    rows = [dict(r) for r in sets["rows"][:6]]
    jpeg = rows[1]["images"][0]["bytes"]
    rows[1] = {**rows[1], "images": [{"bytes": jpeg[: len(jpeg) // 2], "path": "cut.jpg"}]}  # found decoding
    rows[2] = {**rows[2], "images": [{"bytes": b"not an image", "path": "x.png"}] * 2}  # found measuring
    rows[3] = {**rows[3], "images": [{"bytes": None, "path": None}]}  # an empty Image value
    rows[4] = {
        **rows[4],
        "messages": [{"role": "robot", "content": "<image>hi"}, {"role": "assistant", "content": "x"}],
    }
    bad = write_parquet(str(tmp_path / "bad.parquet"), rows, row_group_size=2)
    cfg = DataConfig(dataset=bad, dataset_dir=photos, shuffle=False, num_workers=0)
    train, _, report = load_samples(cfg)
    loader = build_loader(cfg, processor, samples=train, max_tokens=2000, report=report)
    batches(loader)
    where = {(r["file"], r["where"], r["reason"]) for r in report.records}
    assert where == {(bad, "row 1", "corrupt_image"), (bad, "row 2", "corrupt_image"),
                     (bad, "row 3", "bad_structure"), (bad, "row 4", "unknown_role")}  # fmt: skip
    assert "embedded image 'x.png' (12 bytes)" in next(
        r["message"] for r in report.records if r["where"] == "row 2"
    )
    with pytest.raises(DataError, match=f"{bad}, row 3: bad_structure: 'images' must be a path, a"):
        load_samples(DataConfig(dataset=bad, dataset_dir=photos, on_bad_sample="error"))


def test_length_index_follows_the_table_file(sets, photos, processor, tmp_path, caplog):
    table = str(tmp_path / "t.parquet")
    shutil.copy(sets["parquet"], table)
    cfg = DataConfig(dataset=table, dataset_dir=photos, cache_dir=str(tmp_path / "cache"), num_workers=0)
    train, _, _ = load_samples(cfg)
    first = build_loader(cfg, processor, samples=train, max_tokens=400).lengths
    calls = []
    measure = processor.measure
    processor.measure = lambda *a: calls.append(a) or measure(*a)
    try:
        assert build_loader(cfg, processor, samples=train, max_tokens=400).lengths == first and not calls
        os.utime(table, ns=(1, 1))  # the table changed: its rows are measured again
        with caplog.at_level("INFO", logger="vlmtune.data"):
            assert build_loader(cfg, processor, samples=train, max_tokens=400).lengths == first
        assert len(calls) == 15 and "stale" in caplog.text
    finally:
        processor.measure = measure


def test_convert_llava_writes_one_self_contained_parquet(tiny_ckpt, photos, processor, tmp_path, capsys):
    llava = [
        {"id": "a", "image": "astronaut.png", "conversations": [{"from": "human", "value": "<image>\nWho?"}, {"from": "gpt", "value": "A person."}]},
        {"id": "b", "image": "rocket.jpg", "conversations": [{"from": "human", "value": "What flies?<image>"}, {"from": "gpt", "value": "A rocket."}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "d", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "?"}]},
    ]  # fmt: skip
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(llava))
    image_dir = os.path.join(photos, "img")
    common = ["data", "convert-llava", "--input", str(src), "--image-dir", image_dir]
    assert main([*common, "--output", str(tmp_path / "out.jsonl")]) == 0
    assert main([*common, "--output", str(tmp_path / "made" / "out.parquet")]) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 with a missing image" in printed and "images are embedded in" in printed
    moved = tmp_path / "elsewhere.parquet"  # self-contained: no image folder needed
    shutil.move(tmp_path / "made" / "out.parquet", moved)
    from_json, _, _ = read(str(tmp_path / "out.jsonl"), image_dir)  # the paths are relative to --image-dir
    from_table, _, _ = read(str(moved), str(tmp_path / "made"))
    assert len(from_json) == len(from_table) == 3
    for a, b in zip(from_json, from_table):
        assert_same_tensors(processor.encode(a, image_dir), processor.encode(b))
    assert pq.ParquetFile(moved).schema_arrow.field("images").type == pa.list_(IMAGE)
    assert main(["data", "inspect", "--dataset", str(moved), "--model", tiny_ckpt[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 3


def test_a_table_with_both_layouts_reads_each_row_by_its_own(photos, processor, tmp_path):
    """Every row of a table has every column: the other layout's columns are null there."""
    png = open(os.path.join(photos, "img", "coffee.png"), "rb").read()
    llava = {"id": "l", "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "Coffee."}],
             "image": {"bytes": png, "path": "coffee.png"}}  # fmt: skip
    messages = {"id": "m", "messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "Coffee."}],
                "images": [{"bytes": png, "path": "coffee.png"}]}  # fmt: skip
    value = pa.struct([("from", pa.string()), ("value", pa.string())])
    schema = MESSAGES.append(pa.field("conversations", pa.list_(value))).append(pa.field("image", IMAGE))
    path = str(tmp_path / "mixed.parquet")
    pq.write_table(pa.Table.from_pylist([llava, messages], schema=schema), path)
    assert pq.read_table(path).to_pylist()[1]["conversations"] is None
    rows, _, report = read(path, photos)
    assert report.total == 0
    a, b = (processor.encode(r) for r in rows)
    assert_same_tensors(a, b)


def test_reading_problems_name_the_table(tmp_path, photos):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        read(str(tmp_path / "broken.parquet"), photos)
    with pytest.raises(DataError, match="no file matches"):
        read(str(tmp_path / "none-*.parquet"), photos)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is a directory without .parquet files"):
        read(str(tmp_path / "empty"), photos)
