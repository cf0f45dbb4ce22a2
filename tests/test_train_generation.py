"""Generation metrics during training (`eval.generate`) and W&B offline logging.

One single-process run trains 4 steps on a Parquet training set with the images embedded (a broken row is
skipped, named by file and row in skipped.jsonl) with validation answers at steps 2 and 4 (metrics.jsonl,
TensorBoard, the plot, W&B offline). A two-rank FSDP run then answers validation prompts whose references were made from
the first run's answers: each rank generates its share with the sharded model (the ranks hold different
numbers of prompts, one of them without an image, so one rank idles while the other decodes), the answers
equal the single process's, and the logged numbers equal `vlmtune eval --generate` on the run's checkpoint.
Under tensor or context parallelism both ranks answer the same prompts together, with the same answers.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from test_train_parallel import torchrun
from test_train_utils import run_config
from vlmtune.cli import main
from vlmtune.demo import make_dataset
from vlmtune.errors import ConfigError
from vlmtune.generation.answers import normalize_answer
from vlmtune.models.qwen3_vl import load_config
from vlmtune.train.config import from_dict
from vlmtune.train.metrics import read_metrics
from vlmtune.train.run_setup import check_config
from vlmtune.train.trainer import train

STEPS, N_VAL = 4, 5
METRICS = ["exact", "contains", "f1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Four heads (tp=2 divides them) and small image bounds in the checkpoint's own preprocessor config,
    which `vlmtune eval` reads too."""
    from vlmtune.testing import make_tiny_checkpoint

    d = str(tmp_path_factory.mktemp("ckpt"))
    make_tiny_checkpoint(
        d, seed=0, text_hidden=32, text_layers=2, heads=4, kv_heads=4, head_dim=16,
        vision_hidden=32, vision_depth=2, vision_heads=4, deepstack=(0,),
    )  # fmt: skip
    path = os.path.join(d, "preprocessor_config.json")
    cfg = json.load(open(path))
    cfg["size"] = {"shortest_edge": 4096, "longest_edge": 9216}
    json.dump(cfg, open(path, "w"))
    return d


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The demo's shapes, the training set as Parquet with the images embedded (row 5's bytes broken: a skip
    naming the file and the row); the first validation question is asked without its image (a text-only
    prefill)."""
    d = str(tmp_path_factory.mktemp("vqa"))
    make_dataset(d, n_train=24, n_eval=N_VAL, seed=1)
    rows = []
    for k, s in enumerate(json.load(open(os.path.join(d, "train.json")))):
        data = [open(os.path.join(d, p), "rb").read() for p in s["images"]]
        rows.append(
            {
                **s,
                "images": [{"bytes": b if k != 5 else b[:40], "path": p} for b, p in zip(data, s["images"])],
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(d, "train.parquet"), row_group_size=8)
    path = os.path.join(d, "heldout.json")
    val = json.load(open(path))
    del val[0]["images"]
    val[0]["messages"][0]["content"] = val[0]["messages"][0]["content"].replace("<image>", "")
    json.dump(val, open(path, "w"))
    return d


def config(out, ckpt, data_dir, val="heldout.json", **sections) -> dict:
    """A small learning rate keeps the answers those of a random model: varied, never empty."""
    return run_config(
        out, ckpt, data_dir, steps=STEPS, keep_last=1, optim={"lr": 1e-5},
        data={"dataset": "train.parquet", "val_dataset": val, "image_min_pixels": None, "image_max_pixels": None},
        eval={"interval": 2, "generate": True, "max_new_tokens": 6, "metrics": METRICS, "batch_size": 2},
        **sections,
    )  # fmt: skip


@pytest.fixture(scope="module")
def single(tmp_path_factory, ckpt, dataset):
    out = str(tmp_path_factory.mktemp("single"))
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        raw = config(out, ckpt, dataset, logging={"tensorboard": True, "wandb": True, "wandb_project": "t"})
        summary = train(from_dict(raw))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return out, summary


def answers(out, step) -> list[dict]:
    with open(os.path.join(out, "generations", f"step_{step:06d}.jsonl")) as f:
        return [json.loads(line) for line in f]


def answer_records(out) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out) if "val_answers" in r}


def test_answer_metrics_in_metrics_jsonl_tensorboard_and_plot(single, dataset):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, summary = single
    (skip,) = [json.loads(line) for line in open(os.path.join(out, "skipped.jsonl"))]
    assert (skip["file"], skip["where"], skip["reason"]) == (
        os.path.join(dataset, "train.parquet"),
        "row 5",
        "corrupt_image",
    )
    assert summary["samples"]["train"] == 23 and summary["samples"]["skipped"] == 1
    records = answer_records(out)
    assert sorted(records) == [2, 4]
    for step, r in records.items():
        scored = answers(out, step)
        assert r["val_answers"] == len(scored) == N_VAL
        for key, metric in (
            ("val_exact_match", "exact"),
            ("val_contains_match", "contains"),
            ("val_f1", "f1"),
        ):
            assert r[key] == pytest.approx(sum(float(s[metric]) for s in scored) / N_VAL)
        assert all(s["prediction"] == s["prediction"].strip() and "reference" in s for s in scored)
    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"val/exact_match", "val/contains_match", "val/f1", "val/loss"} <= set(tags)
    assert [e.step for e in events.Scalars("val/f1")] == [2, 4]
    # Three panels (loss, answers, lr) instead of two: 3 x 3 inches at 100 dpi.
    assert Image.open(summary["plot"]).size == (700, 900)


def wandb_records(run_file: str) -> list:
    """The protobuf records of a W&B run file (a LevelDB-style log: 32 KiB blocks of CRC'd chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, out, pending = open(run_file, "rb").read(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # block trailer or padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full / first, then middle / last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def test_wandb_offline_run_holds_metrics_and_config(single):
    out, _ = single
    (run_file,) = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    records = wandb_records(run_file)
    config = {
        i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "run"
        for i in r.run.config.update
    }  # fmt: skip
    assert config["output_dir"] == out and config["eval"]["generate"] is True
    assert config["eval"]["metrics"] == METRICS and config["train"]["train_iters"] == STEPS
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
    logged = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert sorted(history) == [1, 2, 3, 4]
    for step, r in logged.items():
        assert history[step]["loss"] == pytest.approx(r["loss"], rel=1e-12)
    for step, r in answer_records(out).items():
        assert history[step]["val_exact_match"] == r["val_exact_match"]
        assert history[step]["val_f1"] == pytest.approx(r["val_f1"], rel=1e-12)


def test_two_rank_answers_equal_one_process_and_vlmtune_eval(single, ckpt, dataset, tmp_path):
    out1, _ = single
    # References made from the single process's final answers: exact, contained, and wrong ones.
    first = answers(out1, STEPS)
    val = json.load(open(os.path.join(dataset, "heldout.json")))
    refs = [first[0]["prediction"], normalize_answer(first[1]["prediction"])[1:-1] or "x", "not this"]
    refs += [first[3]["prediction"], first[4]["prediction"] + " and more"]
    for sample, ref in zip(val, refs):
        sample["messages"][-1]["content"] = ref
    crafted = os.path.join(dataset, "crafted.json")
    json.dump(val, open(crafted, "w"))

    out = tmp_path / "fsdp2"
    torchrun(out, config(out, ckpt, dataset, val="crafted.json"), 2)
    two = answers(str(out), STEPS)
    assert [a["prediction"] for a in two] == [a["prediction"] for a in first]
    record = answer_records(str(out))[STEPS]
    assert record["val_exact_match"] == pytest.approx(2 / 5) and record["val_contains_match"] >= 3 / 5

    report = tmp_path / "eval.json"
    argv = ["eval", "--model", str(out), "--dataset", crafted, "--dataset-dir", dataset, "--generate",
            "--max-new-tokens", "6", "--metrics", ",".join(METRICS), "--json", str(report)]  # fmt: skip
    assert main(argv) == 0
    got = json.loads(report.read_text())
    assert [p["prediction"] for p in got["predictions"]] == [a["prediction"] for a in two]
    for key in ("exact_match", "contains_match", "f1"):
        assert got[key] == record[f"val_{key}"]


@pytest.mark.parametrize("parallel", [{"tp": 2}, {"cp": 2}], ids=["tp2", "cp2"])
def test_tensor_or_context_parallel_answers_equal_one_process(single, ckpt, dataset, tmp_path, parallel):
    """tp=2: both ranks answer every prompt together, the lm_head's vocabulary-sharded logits gathered.
    cp=2: both ranks decode the same prompts, each over whole sequences, parameters gathered over both."""
    out1, _ = single
    out = tmp_path / "run"
    torchrun(out, config(out, ckpt, dataset, parallel=parallel), 2)
    for step in (2, STEPS):
        assert [a["prediction"] for a in answers(str(out), step)] == [
            a["prediction"] for a in answers(out1, step)
        ]


def test_generation_config_is_checked(ckpt, dataset, tmp_path):
    raw = config(tmp_path, ckpt, dataset, parallel={"pp": 2, "llm_pp_layers": [1, 1]})
    with pytest.raises(ConfigError, match="eval.generate under pipeline parallelism"):
        check_config(from_dict(raw), load_config(ckpt), 2)
    raw = config(tmp_path, ckpt, dataset)
    raw["data"]["val_dataset"] = None
    with pytest.raises(ConfigError, match="eval.generate: true needs validation samples"):
        from_dict(raw)
    raw = config(tmp_path, ckpt, dataset)
    raw["eval"]["metrics"] = ["exact", "bleu"]
    with pytest.raises(ConfigError, match="eval.metrics: \\['bleu'\\] not known; choose from exact"):
        from_dict(raw)
