"""`vlmtune export` and `save_hf`: transformers loads the export with logits equal to ours; `vlmtune plot`."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from test_train_utils import make_run_checkpoint
from vlmtune.checkpoint.export import load_model_from_checkpoint
from vlmtune.cli import main
from vlmtune.demo import make_dataset
from vlmtune.train.config import from_dict
from vlmtune.train.trainer import train


@pytest.fixture(scope="module")
def run_ckpt(tmp_path_factory):
    return make_run_checkpoint(str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def run(tmp_path_factory, run_ckpt):
    data = str(tmp_path_factory.mktemp("vqa"))
    make_dataset(data, n_train=16, n_eval=3, seed=2)
    out = tmp_path_factory.mktemp("run")
    raw = {
        "output_dir": str(out),
        "model": {"init_from_hf": run_ckpt},
        "data": {"dataset": "train.json", "val_dataset": "heldout.json", "dataset_dir": data, "num_workers": 0,
                 "image_min_pixels": 4096, "image_max_pixels": 9216},
        "train": {"train_iters": 2, "micro_batch_tokens": 400},
        "optim": {"lr": 1e-2},
        "checkpoint": {"save_hf": True},
        "logging": {"tensorboard": True, "progress_bar": False},
        "eval": {"interval": 1},
    }  # fmt: skip
    summary = train(from_dict(raw))
    return out, data, summary


def test_export_loads_in_transformers_with_equal_logits(run, run_ckpt, tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlmtune.data import build_processor

    out, data, _ = run
    hf = str(tmp_path / "hf")
    assert main(["export", str(out), "--out", hf]) == 0
    ours = load_model_from_checkpoint(str(out)).eval()
    base = AutoModelForImageTextToText.from_pretrained(run_ckpt, attn_implementation="eager")
    ref = AutoModelForImageTextToText.from_pretrained(hf, attn_implementation="eager").eval()
    # Training moved the weights away from the base checkpoint, and the export carries them.
    assert not torch.equal(ref.lm_head.weight, base.lm_head.weight)
    sample = json.load(open(os.path.join(data, "train.json")))[0]
    enc = build_processor(hf, image_min_pixels=4096, image_max_pixels=9216).encode(sample, data)
    ids = enc["input_ids"][None]
    with torch.no_grad():
        theirs = ref(
            input_ids=ids,
            pixel_values=enc["pixel_values"],
            image_grid_thw=enc["image_grid_thw"],
            mm_token_type_ids=(ids == ours.args.image_token_id).long(),
        ).logits
        mine = ours(ids, pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    # save_hf at the end of the run wrote the same tensors.
    a = load_file(os.path.join(out, "hf", "model-00001-of-00001.safetensors"))
    b = load_file(os.path.join(hf, "model-00001-of-00001.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json"):
        assert os.path.exists(os.path.join(hf, name))


def test_metrics_tensorboard_and_plot(run, tmp_path, capsys):
    out, _, summary = run
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train_records = [r for r in records if "loss" in r]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "peak_mem_gb"):
        assert key in train_records[0]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2] and train_records[0]["tokens"] > 0
    assert all(r["mfu"] > 0 for r in train_records)  # model FLOPs (train/flops.py) over the measured CPU peak
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [1, 2] and val[1]["val_tokens"] > 0 and val[1]["val_loss"] > 0
    assert os.listdir(os.path.join(out, "tensorboard"))
    assert summary["plot"] == os.path.join(out, "loss.png") and os.path.getsize(summary["plot"]) > 1000
    png = str(tmp_path / "curve.png")
    assert main(["plot", str(out), "--out", png]) == 0 and os.path.getsize(png) > 1000
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics" in capsys.readouterr().err


def test_export_errors_on_a_non_checkpoint(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
