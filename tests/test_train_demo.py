"""`vlmtune demo` smoke run with few steps: every promised output is written."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from vlmtune.cli import main
from vlmtune.demo import COLOURS, SHAPES, make_dataset


def test_synthetic_dataset_is_messages_format_with_heldout_split(tmp_path):
    train_path, heldout_path = make_dataset(str(tmp_path), n_train=12, n_eval=4, seed=5)
    train, heldout = json.load(open(train_path)), json.load(open(heldout_path))
    assert len(train) == 12 and len(heldout) == 4
    assert not {s["images"][0] for s in train} & {s["images"][0] for s in heldout}
    for s in train + heldout:
        turns = s["messages"]
        assert len(turns) == (6 if s in train else 2)  # training images are asked all three questions
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert turns[0]["content"].startswith("<image>")
        assert all(t["content"] in (*SHAPES, *COLOURS, "1", "2", "3") for t in turns[1::2])
        assert Image.open(tmp_path / s["images"][0]).size == (96, 96)


@pytest.mark.slow
def test_demo_smoke(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--steps", "3", "--train-samples", "40", "--eval-samples", "4"]) == 0
    result = json.load(open(os.path.join(out, "eval.json")))
    assert 0 <= result["accuracy_before"] <= 1 and 0 <= result["accuracy_after"] <= 1
    assert result["train_steps"] == 3 and result["heldout_samples"] == 4
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) >= 1
    assert os.path.exists(os.path.join(out, "hf", "config.json"))
    assert os.path.exists(os.path.join(out, "loss.png"))
    text = capsys.readouterr().out
    assert "question: " in text and "model answer: " in text and "held-out questions" in text
