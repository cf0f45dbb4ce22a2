"""Bad input never kills a run: a corpus of broken datasets, media, configs, model directories, checkpoints and
command-line arguments, each through the real CLI.

Every kind ends in one of two ways, never in a traceback, a hang or a silent drop:
- data-level problems under `on_bad_sample: skip` are skipped and counted: one `vlmtune train` run (in its own
  process, default `num_workers: 2`) over a dataset mixing good samples with every such kind reports each
  bad sample with its line and reason in `skipped.jsonl`, and trained + skipped = dataset size;
- everything else stops with one `error: <what, where, what to do>` line and exit status 2 (run through
  `tests/cli_runner.py`: `vlmtune.cli.main` in a forked child per command, each with a timeout);
- under `torchrun` / two ranks, a config error, a bad model directory and a per-rank checkpoint file that
  only one rank misses end both ranks within seconds with one message.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from cli_runner import SRC, CliServer
from test_train_utils import make_run_checkpoint
from vlmtune.checkpoint import load_pretrained
from vlmtune.data import DataConfig

ERROR_LINE = re.compile(r"^(vlmtune[\w -]*: )?error: \S", re.MULTILINE)
MICRO = 300  # train.micro_batch_tokens of every run here


# ---------------------------------------------------------------------------------------------- corpus


def _png_header(path, width, height):
    """A PNG whose header declares width x height (no pixel data)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _media(data: str, photo: str) -> None:
    """Good and bad media files in `data/`."""
    chelsea = Image.open(photo).convert("RGB")
    chelsea.resize((64, 64)).save(os.path.join(data, "good.png"))
    chelsea.resize((256, 256)).save(os.path.join(data, "full.jpg"), quality=95)
    full = open(os.path.join(data, "full.jpg"), "rb").read()
    open(os.path.join(data, "truncated.jpg"), "wb").write(full[: len(full) // 2])
    ramp = np.arange(64 * 64, dtype=np.float64).reshape(64, 64) / (64 * 64 - 1)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(os.path.join(data, "gray16.png"))
    Image.fromarray(ramp.astype(np.float32)).save(os.path.join(data, "float01.tiff"))
    Image.fromarray((ramp * 1000).astype(np.float32)).save(os.path.join(data, "float_hdr.tiff"))
    open(os.path.join(data, "text.png"), "w").write("this is not an image\n")
    open(os.path.join(data, "empty.png"), "wb").close()
    os.makedirs(os.path.join(data, "folder.png"))
    Image.new("RGB", (1, 1)).save(os.path.join(data, "speck.png"))
    chelsea.resize((1000, 4)).save(os.path.join(data, "thin.png"))
    _png_header(os.path.join(data, "bomb.png"), 15000, 15000)
    open(os.path.join(data, "noise.mp4"), "wb").write(np.random.default_rng(0).bytes(4096))
    shutil.copy(os.path.join(data, "good.png"), os.path.join(data, "still.mp4"))  # one frame
    shutil.copy(os.path.join(data, "good.png"), os.path.join(os.path.dirname(data), "outside.png"))


def _qa(content="<image>What is this?", answer="A cat.", images=("good.png",), videos=()) -> dict:
    s = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}
    if images:
        s["images"] = list(images)
    if videos:
        s["videos"] = list(videos)
    return s


def _line(sample) -> bytes:
    return json.dumps(sample).encode() if not isinstance(sample, bytes) else sample


def mixed_lines(data: str) -> list[tuple[bytes, str | None]]:
    """(JSONL line, reason it is skipped for, or None for a good sample)."""
    outside_abs = os.path.join(os.path.dirname(data), "outside.png")
    good = [
        (_qa(), None),
        (_qa(images=[os.path.join(data, "good.png")]), None),  # absolute, inside dataset_dir
        (_qa("<image>Grey ramp?", images=["gray16.png"]), None),  # 16-bit grey: scaled, not white
        (_qa("<image>Float ramp?", images=["float01.tiff"]), None),  # float in [0, 1]: scaled, not black
        (_qa("Say hi.", "hi", images=()), None),
        (_qa("Line\u2028separator inside a string.", "ok", images=()), None),  # JSONL split on \n only
        (_qa("<image>Photo?", images=["full.jpg"]), None),
    ]
    bad = [
        (b'{"messages": [', "malformed_json"),
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "malformed_json"),  # too deep
        (
            b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}',
            "invalid_text",
        ),  # not UTF-8: only this line is lost
        (
            b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}',
            "invalid_text",
        ),
        (_qa(images=["good\u0000.png"]), "invalid_text"),
        (b"[1, 2, 3]", "bad_structure"),
        (b"42", "bad_structure"),
        ({"text": "no conversation"}, "bad_structure"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "bad_structure"),
        ({**_qa(), "images": 5}, "bad_structure"),
        ({"messages": []}, "bad_structure"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
            "bad_structure",
        ),
        (
            {"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "unknown_role",
        ),
        (
            {"messages": [{"role": ["user"], "content": "a"}, {"role": "assistant", "content": "b"}]},
            "unknown_role",
        ),
        (
            {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}]},
            "empty_content",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn"),
        (_qa("<image><image>Two?"), "placeholder_mismatch"),
        (_qa("No placeholder.", images=["good.png"]), "placeholder_mismatch"),
        (_qa(images=["../outside.png"]), "media_outside_dataset_dir"),
        (_qa(images=["../../../../../../../../etc/passwd"]), "media_outside_dataset_dir"),
        (_qa(images=[outside_abs]), "media_outside_dataset_dir"),
        (_qa(images=["missing.png"]), "missing_image"),
        (_qa(images=["folder.png"]), "missing_image"),
        (_qa(images=["text.png"]), "corrupt_image"),
        (_qa(images=["empty.png"]), "corrupt_image"),
        (_qa(images=["truncated.jpg"]), "corrupt_image"),  # found while decoding, in a DataLoader worker
        (_qa(images=["float_hdr.tiff"]), "unsupported_image"),  # found while decoding
        (_qa(images=["speck.png"]), "image_too_small"),
        (_qa(images=["thin.png"]), "aspect_ratio"),
        (_qa(images=["bomb.png"]), "decompression_bomb"),
        (_qa("<video>What?", images=(), videos=["missing.mp4"]), "missing_video"),
        (_qa("<video>What?", images=(), videos=["noise.mp4"]), "corrupt_video"),
        (_qa("<video>What?", images=(), videos=["still.mp4"]), "corrupt_video"),
        (_qa("word " * 400, images=()), "over_long"),  # over train.micro_batch_tokens
    ]
    flood = [
        (_qa(images=[f"lost_{i}.png"]), "missing_image") for i in range(12)
    ]  # logged 5 times, counted 12
    return [(_line(s), r) for s, r in good + bad + flood]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photo_paths):
    root = str(tmp_path_factory.mktemp("corpus"))
    ckpt = make_run_checkpoint(os.path.join(root, "ckpt"))
    data = os.path.join(root, "data")
    os.makedirs(data)
    _media(data, photo_paths["chelsea"])
    lines = mixed_lines(data)
    with open(os.path.join(data, "mixed.jsonl"), "wb") as f:
        f.write(b"".join(line + b"\n" for line, _ in lines))
    listed = [_qa("Hello?", images=()), _qa("Again?", images=())]
    with open(os.path.join(data, "bom_list.json"), "wb") as f:  # a JSON list behind a UTF-8 byte-order mark
        f.write(codecs.BOM_UTF8 + json.dumps(listed, indent=1).encode())
    with open(os.path.join(data, "good.jsonl"), "w") as f:
        f.writelines(json.dumps(_qa(f"<image>Question {i}?")) + "\n" for i in range(4))
    expected = {f"line {n}": r for n, (_, r) in enumerate(lines, start=1) if r}
    return {"root": root, "ckpt": ckpt, "data": data, "expected": expected, "size": len(lines) + len(listed)}


def train_config(corpus, out: str, **sections) -> dict:
    raw = {
        "output_dir": out,
        "model": {"init_from_hf": corpus["ckpt"]},
        "data": {"dataset": "mixed.jsonl,bom_list.json", "dataset_dir": corpus["data"],
                 "image_min_pixels": 4096, "image_max_pixels": 9216},
        "train": {"epochs": 1, "micro_batch_tokens": MICRO, "global_batch_tokens": 2 * MICRO, "seed": 3},
        "checkpoint": {"save_hf": False, "keep_last": 1},
        "logging": {"tensorboard": False, "progress_bar": False},
    }  # fmt: skip
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return raw


def write_config(path: str, raw) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def cli_env() -> dict:
    return dict(
        os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1"
    )


def assert_clean_error(result, expect: str) -> None:
    """Exit 2, an `error:` line saying `expect`, no traceback."""
    assert result.rc == 2, f"exit {result.rc}, want 2:\n{result.output[-3000:]}"
    assert "Traceback" not in result.output, result.output[-3000:]
    assert ERROR_LINE.search(result.output), result.output[-3000:]
    assert expect in result.output, f"{expect!r} not in:\n{result.output[-3000:]}"


# ---------------------------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def mixed_run(corpus):
    """One real `vlmtune train` process over the mixed dataset, default num_workers (2)."""
    out = os.path.join(corpus["root"], "run")
    cfg = write_config(os.path.join(corpus["root"], "run.yaml"), train_config(corpus, out))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "vlmtune.cli", "train", cfg], env=cli_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    return out, proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def test_mixed_dataset_trains_and_counts_every_bad_sample(corpus, mixed_run):
    out, rc, output, _ = mixed_run
    assert rc == 0 and "Traceback" not in output, output[-4000:]
    assert DataConfig(dataset="x.json").num_workers == 2  # the run used the default workers
    with open(os.path.join(out, "skipped.jsonl")) as f:
        records = [json.loads(line) for line in f]
    mixed = os.path.join(corpus["data"], "mixed.jsonl")
    got = {r["where"]: r["reason"] for r in records}
    assert all(r["file"] == mixed for r in records) and len(got) == len(records), "one record per sample"
    assert got == corpus["expected"], "every bad line is skipped for its own reason, nothing else is"
    skipped, size = len(records), corpus["size"]
    trained = size - skipped
    assert f"samples: {size} read = {trained} for training + 0 for validation + {skipped} skipped" in output
    assert f"skipped samples: {skipped}" in output and "over_long" in output
    # the flood: the first 5 of a reason are logged, the others only counted
    assert len(re.findall(r"skipping sample: .*missing_image", output)) == 5
    assert "further ones are counted" in output
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [m for m in metrics if "loss" in m]
    assert steps and all("skipped_samples" in m and "skipped_by_reason" in m for m in steps)
    assert steps[-1]["skipped_samples"] == skipped and sum(steps[-1]["skipped_by_reason"].values()) == skipped
    found_late = {"corrupt_image": 1, "unsupported_image": 1}  # the truncated JPEG and the HDR float TIFF
    assert steps[0]["skipped_samples"] >= skipped - sum(found_late.values())
    assert steps[-1]["consumed_samples"] >= trained  # one epoch: every usable sample was trained on


def test_inspect_counts_the_same_skips(corpus, cli):
    r = cli.run(["data", "inspect", "--dataset", "mixed.jsonl,bom_list.json", "--dataset-dir", corpus["data"],
                 "--model", corpus["ckpt"], "--max-tokens", str(MICRO), "--json"])  # fmt: skip
    assert r.rc == 0 and "Traceback" not in r.output, r.output[-3000:]
    report = json.loads(r.output[r.output.index("{") : r.output.rindex("}") + 1])
    decoded_only = {"corrupt_image": 1, "unsupported_image": 1}  # inspect reads headers only
    want = {}
    for reason in corpus["expected"].values():
        want[reason] = want.get(reason, 0) + 1
    for reason, n in decoded_only.items():
        want[reason] -= n
    want = {k: v for k, v in want.items() if v}
    assert report["skipped"]["by_reason"] == want
    assert report["samples"] + report["skipped"]["total"] == corpus["size"]


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    server = CliServer(str(tmp_path_factory.mktemp("cli")))
    yield server
    server.close()


def _variant(corpus, name: str, edit) -> str:
    """A copy of the tiny model directory (files linked) with `edit(dir)` applied."""
    d = os.path.join(corpus["root"], "models", name)
    if os.path.exists(d):
        return d
    os.makedirs(d)
    for f in os.listdir(corpus["ckpt"]):
        os.symlink(os.path.join(corpus["ckpt"], f), os.path.join(d, f))
    edit(d)
    return d


def _write(d: str, name: str, content) -> None:
    path = os.path.join(d, name)
    if os.path.lexists(path):
        os.unlink(path)
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode) as f:
        f.write(content if isinstance(content, (str, bytes)) else json.dumps(content))


def _config_edit(change):
    def edit(d):
        cfg = json.load(open(os.path.join(d, "config.json")))
        change(cfg)
        _write(d, "config.json", cfg)

    return edit


def _tensors_edit(change):
    def edit(d):
        tensors = load_file(os.path.join(d, "model.safetensors"))
        change(tensors)
        os.unlink(os.path.join(d, "model.safetensors"))
        save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})

    return edit


def _remove(*names):
    def edit(d):
        for n in names:
            os.unlink(os.path.join(d, n))

    return edit


def _sharded(d):
    _write(d, "model.safetensors.index.json", {"weight_map": {"x": "model-00001-of-00002.safetensors"}})
    os.unlink(os.path.join(d, "model.safetensors"))


def _no_chat_template(d):
    os.unlink(os.path.join(d, "chat_template.jinja"))
    cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
    cfg.pop("chat_template", None)
    _write(d, "tokenizer_config.json", cfg)


def _first_float(tensors) -> str:
    return next(k for k, v in tensors.items() if v.ndim == 2)


MODEL_DIRS = {
    # name: (edit, what the message must say)
    "config_not_json": (lambda d: _write(d, "config.json", "{not json"), "invalid JSON"),
    "config_not_utf8": (lambda d: _write(d, "config.json", b"\xff\xfe{}"), "config.json: unreadable"),
    "config_is_list": (lambda d: _write(d, "config.json", "[1, 2]"), "expected a JSON object"),
    "config_no_text_config": (
        _config_edit(lambda c: c.pop("text_config")),
        "missing required key 'text_config'",
    ),
    "config_wrong_model_type": (
        _config_edit(lambda c: c.update(model_type="llama")),
        "'model_type' is 'llama'",
    ),
    "config_hidden_size_text": (
        _config_edit(lambda c: c["text_config"].update(hidden_size="big")),
        "'hidden_size' must be an integer",
    ),
    "config_zero_heads": (
        _config_edit(lambda c: c["text_config"].update(num_attention_heads=0)),
        "'num_attention_heads' is 0",
    ),
    "config_rope_not_object": (
        _config_edit(lambda c: c["text_config"].update(rope_parameters=[1])),
        "malformed value",
    ),
    "config_token_id_outside_vocab": (
        _config_edit(lambda c: c.update(image_token_id=10**7)),
        "outside the vocabulary",
    ),
    "missing_shard": (_sharded, "lists shard(s) that do not exist"),
    "shard_index_not_json": (
        lambda d: (
            _write(d, "model.safetensors.index.json", "{"),
            os.unlink(os.path.join(d, "model.safetensors")),
        ),
        "unreadable shard index",
    ),
    "no_weights": (_remove("model.safetensors"), "no model.safetensors"),
    "corrupt_safetensors_header": (
        lambda d: _write(d, "model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage header}"),
        "not a readable safetensors file",
    ),
    "truncated_safetensors": (
        lambda d: _write(
            d, "model.safetensors", open(os.path.join(d, "model.safetensors"), "rb").read()[:5000]
        ),
        "not a readable safetensors file",
    ),
    "tensor_wrong_shape": (
        _tensors_edit(lambda t: t.update({_first_float(t): t[_first_float(t)][:, :3].contiguous()})),
        "the config implies",
    ),
    "int8_tensor": (
        _tensors_edit(lambda t: t.update({_first_float(t): t[_first_float(t)].to(torch.int8)})),
        "torch.int8, but the model's weight is torch.float32",
    ),
    "unexpected_tensor": (
        _tensors_edit(lambda t: t.update({"model.extra.weight": torch.zeros(2)})),
        "does not have",
    ),
    "missing_tensor": (_tensors_edit(lambda t: t.pop(_first_float(t))), "missing from the checkpoint"),
    "no_tokenizer_files": (_remove("tokenizer.json", "vocab.json", "merges.txt"), "no tokenizer files"),
    "broken_tokenizer": (lambda d: _write(d, "tokenizer.json", "{broken"), "cannot load the tokenizer"),
    "no_chat_template": (_no_chat_template, "no chat template"),
    "text_only_chat_template": (_remove("chat_template.jinja"), "the chat template refused the conversation"),
    "preprocessor_not_json": (
        lambda d: _write(d, "preprocessor_config.json", "{"),
        "preprocessor_config.json: unreadable",
    ),
    "preprocessor_bad_patch": (
        lambda d: _write(d, "preprocessor_config.json", {"patch_size": "big"}),
        "patch_size = 'big'",
    ),
}


@pytest.mark.parametrize("kind", list(MODEL_DIRS))
def test_bad_model_directory_through_train(corpus, cli, kind):
    edit, expect = MODEL_DIRS[kind]
    model = _variant(corpus, kind, edit)
    out = os.path.join(corpus["root"], "out_model", kind)
    cfg = train_config(corpus, out, model={"init_from_hf": model}, data={"dataset": "good.jsonl"})
    r = cli.run(["train", write_config(os.path.join(corpus["root"], f"model_{kind}.yaml"), cfg)])
    assert_clean_error(r, expect)


def test_float_weights_load_into_another_float_dtype_said_once(corpus, caplog):
    half = _variant(
        corpus, "bf16_weights", _tensors_edit(lambda t: t.update({k: v.bfloat16() for k, v in t.items()}))
    )
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        model = load_pretrained(half, dtype=torch.float32)
    said = [r.getMessage() for r in caplog.records if "weights loaded as" in r.getMessage()]
    assert said == [f"{half}: bfloat16 weights loaded as float32"]
    assert next(model.parameters()).dtype == torch.float32


def _train_cases(corpus) -> dict:
    """name: (config mapping or raw file text, overrides, expected message)."""
    root, data = corpus["root"], corpus["data"]
    open(os.path.join(root, "a_file"), "w").close()
    open(os.path.join(data, "garbage.json"), "wb").write(
        np.random.default_rng(1).bytes(2000).replace(b"[", b"x")
    )
    open(os.path.join(data, "broken_list.json"), "w").write('[\n {"messages": []},\n {"messages": [}\n]\n')
    open(os.path.join(data, "empty.jsonl"), "w").close()
    with open(os.path.join(data, "missing_images.jsonl"), "w") as f:
        f.write(json.dumps(_qa(images=["nope.png"])) + "\n")
    with open(os.path.join(data, "truncated.jsonl"), "w") as f:
        f.writelines(json.dumps(_qa(images=[n])) + "\n" for n in ("good.png", "truncated.jpg", "good.png"))
    with open(os.path.join(data, "long.jsonl"), "w") as f:
        f.writelines(json.dumps(_qa("word " * 400, images=())) + "\n" for _ in range(3))
    ok = {"data": {"dataset": "good.jsonl"}}
    return {
        "config_missing": (None, [], "config file not found"),
        "config_invalid_yaml": ("model: [unclosed\n", [], "invalid YAML"),
        "config_is_a_list": ("- 1\n- 2\n", [], "must be a mapping of sections"),
        "config_not_utf8": (b"output_dir: \xff\xfe\n", [], "cannot read"),
        "config_is_a_directory": ("DIR", [], "cannot read"),
        "unknown_section": ({**ok, "trainer": {}}, [], "trainer: unknown section"),
        "unknown_key": ({**ok, "optim": {"learning_rate": 1}}, [], "optim.learning_rate: unknown key"),
        "wrong_type": ({**ok, "optim": {"lr": "fast"}}, [], "optim.lr: expected float"),
        "bad_choice": ({**ok, "loss": {"type": "median"}}, [], "loss.type: 'median' is not one of"),
        "negative_lr": ({**ok, "optim": {"lr": -1.0}}, [], "optim.lr: must be positive"),
        "val_ratio_above_one": ({"data": {"dataset": "good.jsonl", "val_ratio": 1.5}}, [], "data.val_ratio"),
        "override_bad_yaml": (ok, ["--train.seed=[1"], "invalid YAML"),
        "override_without_value": (ok, ["--train.seed"], "expected --section.key=value"),
        "override_into_a_value": (ok, ["--output_dir.x=1"], "is not a section"),
        "impossible_layout": ({**ok, "parallel": {"tp": 3}}, [], "does not divide the world size"),
        "cuda_without_gpu": ({**ok, "train": {"device": "cuda"}}, [], "no CUDA device is visible"),
        "output_dir_is_a_file": ({**ok, "output_dir": os.path.join(root, "a_file")}, [], "cannot create"),
        "model_dir_missing": ({**ok, "model": {"init_from_hf": os.path.join(root, "nowhere")}}, [], "no config.json"),
        "dataset_missing": ({"data": {"dataset": "nope.jsonl"}}, [], "dataset file not found"),
        "dataset_dir_missing": (
            {"data": {"dataset": "good.jsonl", "dataset_dir": os.path.join(root, "nowhere")}}, [], "not a directory"
        ),
        "dataset_is_a_directory": ({"data": {"dataset": data}}, [], "is a directory"),
        "dataset_not_json": ({"data": {"dataset": "garbage.json"}}, [], "no usable training samples"),
        "json_list_syntax_error": ({"data": {"dataset": "broken_list.json"}}, [], "broken_list.json, line 3"),
        "empty_dataset": ({"data": {"dataset": "empty.jsonl"}}, [], "no usable training samples (0 read"),
        "every_sample_over_budget": ({"data": {"dataset": "long.jsonl"}}, [], "train.micro_batch_tokens"),
        "on_bad_sample_error_at_load": (
            {"data": {"dataset": "missing_images.jsonl", "on_bad_sample": "error"}}, [], "line 1: missing_image"
        ),
        "on_bad_sample_error_in_worker": (
            {"data": {"dataset": "truncated.jsonl", "on_bad_sample": "error"}}, [], "line 2: corrupt_image"
        ),
        "cache_dir_is_a_file": (
            {"data": {"dataset": "good.jsonl", "cache_dir": os.path.join(root, "a_file")}}, [], "data.cache_dir"
        ),
        "load_missing": ({**ok, "checkpoint": {"load": os.path.join(root, "nowhere")}}, [], "checkpoint.load"),
        "load_not_a_checkpoint": ({**ok, "checkpoint": {"load": data}}, [], "not a checkpoint"),
    }  # fmt: skip


TRAIN_KINDS = [
    "config_missing", "config_invalid_yaml", "config_is_a_list", "config_not_utf8", "config_is_a_directory",
    "unknown_section", "unknown_key", "wrong_type", "bad_choice", "negative_lr", "val_ratio_above_one",
    "override_bad_yaml", "override_without_value", "override_into_a_value", "impossible_layout",
    "cuda_without_gpu", "output_dir_is_a_file", "model_dir_missing", "dataset_missing", "dataset_dir_missing",
    "dataset_is_a_directory", "dataset_not_json", "json_list_syntax_error", "empty_dataset",
    "every_sample_over_budget", "on_bad_sample_error_at_load", "on_bad_sample_error_in_worker",
    "cache_dir_is_a_file", "load_missing", "load_not_a_checkpoint",
]  # fmt: skip


@pytest.mark.parametrize("kind", TRAIN_KINDS)
def test_bad_train_config_or_data(corpus, cli, kind):
    raw, overrides, expect = _train_cases(corpus)[kind]
    path = os.path.join(corpus["root"], f"train_{kind}.yaml")
    if raw == "DIR":
        os.makedirs(path)
    elif isinstance(raw, (str, bytes)):
        open(path, "wb" if isinstance(raw, bytes) else "w").write(raw)
    elif raw is not None:
        out = os.path.join(corpus["root"], "out_train", kind)
        write_config(path, train_config(corpus, out, **raw))
    assert_clean_error(cli.run(["train", path, *overrides]), expect)


# ---------------------------------------------------------------------------------------------- checkpoints


def _linked_copy(src: str, dst: str) -> None:
    shutil.copytree(src, dst, copy_function=os.link)


def _step(run: str) -> str:
    root = os.path.join(run, "checkpoints")
    return os.path.join(root, open(os.path.join(root, "latest")).read().strip())


def _replace_file(path: str, content: bytes) -> None:
    os.unlink(path)
    open(path, "wb").write(content)


def _edit_meta(change):
    def edit(step):
        meta = json.load(open(os.path.join(step, "meta.json")))
        change(meta)
        _replace_file(os.path.join(step, "meta.json"), json.dumps(meta).encode())

    return edit


def _shard(step: str) -> str:
    return next(os.path.join(step, f) for f in os.listdir(step) if f.endswith(".distcp"))


CHECKPOINTS = {
    # name: (edit of the latest step directory, command: "train" resumes it / "export" converts it, message)
    "latest_names_missing_step": (
        lambda s: _replace_file(os.path.join(os.path.dirname(s), "latest"), b"step_00000999"), "train",
        "not a complete checkpoint",
    ),
    "latest_empty": (lambda s: _replace_file(os.path.join(os.path.dirname(s), "latest"), b""), "train", "names ''"),
    "half_written_step": (lambda s: os.unlink(os.path.join(s, ".metadata")), "train", "not a complete checkpoint"),
    "corrupt_meta_json": (lambda s: _replace_file(os.path.join(s, "meta.json"), b"{"), "train", "meta.json: unreadable"),
    "meta_json_not_ours": (lambda s: _replace_file(os.path.join(s, "meta.json"), b"[]"), "train", "needs 'step'"),
    "missing_rank_file": (lambda s: os.unlink(os.path.join(s, "rank_00000.pt")), "train", "rank_00000.pt: missing"),
    "corrupt_rank_file": (
        lambda s: _replace_file(os.path.join(s, "rank_00000.pt"), b"not a torch file"), "train", "rank_00000.pt: unreadable"
    ),
    "rank_file_without_rng": (
        lambda s: (os.unlink(os.path.join(s, "rank_00000.pt")), torch.save({"loader": None}, os.path.join(s, "rank_00000.pt"))),
        "train", "damaged per-rank state",
    ),
    "refused_load_no_optimizer": (_edit_meta(lambda m: m.update(has_optim=False)), "train", "no_load_optim=true"),
    "refused_load_no_rng": (_edit_meta(lambda m: m.update(has_rng=False)), "train", "no_load_rng=true"),
    "truncated_shard": (
        lambda s: _replace_file(_shard(s), open(_shard(s), "rb").read()[:1000]), "train", "cannot load"
    ),
    "export_latest_missing_step": (
        lambda s: _replace_file(os.path.join(os.path.dirname(s), "latest"), b"step_00000999"), "export",
        "not a complete checkpoint",
    ),
    "export_step_without_dcp_metadata": (
        lambda s: os.unlink(os.path.join(s, ".metadata")), "export-step", "no DCP .metadata"
    ),
    "export_corrupt_dcp_metadata": (
        lambda s: _replace_file(os.path.join(s, ".metadata"), b"garbage"), "export", "unreadable DCP metadata"
    ),
    "export_truncated_shard": (
        lambda s: _replace_file(_shard(s), open(_shard(s), "rb").read()[:1000]), "export", "cannot load"
    ),
    "export_without_hf_assets": (
        lambda s: shutil.rmtree(os.path.join(s, "hf_assets")), "export", "no hf_assets/config.json"
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_bad_checkpoint(corpus, mixed_run, cli, kind):
    edit, command, expect = CHECKPOINTS[kind]
    run = os.path.join(corpus["root"], "ckpt_cases", kind)
    _linked_copy(os.path.join(mixed_run[0], "checkpoints"), os.path.join(run, "checkpoints"))
    edit(_step(run) if os.path.exists(os.path.join(run, "checkpoints", "latest")) else None)
    if command == "train":
        raw = train_config(corpus, run, train={"epochs": 0, "train_iters": 99})
        argv = ["train", write_config(os.path.join(corpus["root"], f"ckpt_{kind}.yaml"), raw)]
    else:
        target = _step(run) if command == "export-step" else run
        argv = ["export", target, "--out", os.path.join(corpus["root"], "exports", kind)]
    assert_clean_error(cli.run(argv), expect)


def test_export_to_a_file_and_a_non_checkpoint(corpus, mixed_run, cli):
    open(os.path.join(corpus["root"], "export_target"), "w").close()
    r = cli.run(["export", mixed_run[0], "--out", os.path.join(corpus["root"], "export_target", "hf")])
    assert_clean_error(r, "cannot create the directory")
    assert_clean_error(cli.run(["export", corpus["data"], "--out", corpus["root"]]), "not a checkpoint")


# ---------------------------------------------------------------------------------------------- commands


def _command_cases(corpus) -> dict:
    data, ckpt = corpus["data"], corpus["ckpt"]
    bad_config = _variant(corpus, "cmd_config_not_json", lambda d: _write(d, "config.json", "{"))
    int8 = os.path.join(corpus["root"], "models", "int8_tensor")
    g = ["--dataset", "good.jsonl", "--dataset-dir", data]
    chat = ["chat", "--model", ckpt]
    return {
        "chat_image_not_an_image": ([*chat, "--image", os.path.join(data, "text.png"), "hi"], "corrupt_image"),
        "chat_image_1x1": ([*chat, "--image", os.path.join(data, "speck.png"), "hi"], "image_too_small"),
        "chat_image_missing": ([*chat, "--image", os.path.join(data, "nope.png"), "hi"], "nope.png: no such file"),
        "chat_video_corrupt": ([*chat, "--video", os.path.join(data, "noise.mp4"), "hi"], "corrupt_video"),
        "chat_prompt_not_utf8": ([*chat, "caf\udce9"], "invalid_text"),
        "chat_max_new_tokens_negative": ([*chat, "--max-new-tokens", "-5", "hi"], "--max-new-tokens: must be >= 1"),
        "chat_max_new_tokens_zero": ([*chat, "--max-new-tokens", "0", "hi"], "must be >= 1"),
        "chat_top_p_above_one": ([*chat, "--top-p", "2", "hi"], "--top-p: must be <= 1"),
        "chat_temperature_nan": ([*chat, "--temperature", "nan", "hi"], "finite"),
        "chat_top_k_negative": ([*chat, "--top-k", "-1", "hi"], "--top-k: must be >= 0"),
        "chat_repetition_penalty_zero": ([*chat, "--repetition-penalty", "0", "hi"], "must be > 0"),
        "chat_seed_not_a_number": ([*chat, "--seed", "abc", "hi"], "expected an integer"),
        "chat_device_unknown": ([*chat, "--device", "tpu", "hi"], "--device 'tpu'"),
        "chat_device_cuda_absent": ([*chat, "--device", "cuda:3", "hi"], "no such CUDA device"),
        "chat_model_missing": (["chat", "--model", os.path.join(data, "nowhere"), "hi"], "not a directory"),
        "chat_model_bad_config": (["chat", "--model", bad_config, "hi"], "invalid JSON"),
        "chat_model_int8": (["chat", "--model", int8, "hi"], "torch.int8"),
        "eval_dataset_missing": (["eval", "--model", ckpt, "--dataset", "nope.json"], "dataset file not found"),
        "eval_max_samples_zero": (["eval", "--model", ckpt, *g, "--max-samples", "0"], "must be >= 1"),
        "eval_batch_size_text": (["eval", "--model", ckpt, *g, "--batch-size", "abc"], "expected an integer"),
        "eval_all_bad": (["eval", "--model", ckpt, "--dataset", "missing_images.jsonl", "--dataset-dir", data],
                         "no usable samples"),
        "eval_on_bad_sample_error": (
            ["eval", "--model", ckpt, "--dataset", "truncated.jsonl", "--dataset-dir", data, "--on-bad-sample", "error"],
            "line 2: corrupt_image",
        ),
        "inspect_max_tokens_negative": (["data", "inspect", "--model", ckpt, *g, "--max-tokens", "-1"], "must be >= 1"),
        "inspect_no_tokenizer": (
            ["data", "inspect", "--model", os.path.join(corpus["root"], "models", "no_tokenizer_files"), *g],
            "no tokenizer files",
        ),
        "inspect_json_list_error": (
            ["data", "inspect", "--model", ckpt, "--dataset", "broken_list.json", "--dataset-dir", data], "line 3"
        ),
        "inspect_dataset_dir_missing": (
            ["data", "inspect", "--model", ckpt, "--dataset", "good.jsonl", "--dataset-dir", "/nowhere"], "not a directory"
        ),
        "convert_hf_bad_config": (["convert", "hf-to-native", "--hf", bad_config, "--out", data + "_x"], "invalid JSON"),
        "convert_hf_int8": (["convert", "hf-to-native", "--hf", int8, "--out", data + "_y"], "is stored as I8"),
        "convert_hf_missing": (["convert", "hf-to-native", "--hf", "/nowhere", "--out", data + "_z"], "not found"),
        "convert_shard_size_negative": (
            ["convert", "native-to-hf", data, "--out", data + "_w", "--max-shard-gb", "-1"], "must be > 0"
        ),
    }  # fmt: skip


COMMAND_KINDS = [
    "chat_image_not_an_image", "chat_image_1x1", "chat_image_missing", "chat_video_corrupt", "chat_prompt_not_utf8",
    "chat_max_new_tokens_negative", "chat_max_new_tokens_zero", "chat_top_p_above_one", "chat_temperature_nan",
    "chat_top_k_negative", "chat_repetition_penalty_zero", "chat_seed_not_a_number", "chat_device_unknown",
    "chat_device_cuda_absent", "chat_model_missing", "chat_model_bad_config", "chat_model_int8",
    "eval_dataset_missing", "eval_max_samples_zero", "eval_batch_size_text", "eval_all_bad",
    "eval_on_bad_sample_error", "inspect_max_tokens_negative", "inspect_no_tokenizer", "inspect_json_list_error",
    "inspect_dataset_dir_missing", "convert_hf_bad_config", "convert_hf_int8", "convert_hf_missing",
    "convert_shard_size_negative",
]  # fmt: skip


@pytest.mark.parametrize("kind", COMMAND_KINDS)
def test_bad_command_input(corpus, cli, kind):
    if kind in ("chat_model_int8", "convert_hf_int8", "inspect_no_tokenizer", "eval_all_bad",
                "eval_on_bad_sample_error", "inspect_json_list_error"):  # fmt: skip
        _prerequisites(corpus)
    argv, expect = _command_cases(corpus)[kind]
    assert_clean_error(cli.run(argv), expect)


def _prerequisites(corpus) -> None:
    """Model variants and datasets other cases made, made here when this case runs on its own."""
    for name in ("int8_tensor", "no_tokenizer_files"):
        if not os.path.exists(os.path.join(corpus["root"], "models", name)):
            _variant(corpus, name, MODEL_DIRS[name][0])
    if not os.path.exists(os.path.join(corpus["data"], "truncated.jsonl")):
        _train_cases(corpus)


# ---------------------------------------------------------------------------------------------- ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_one_message(output: str, expect: str, elapsed: float) -> None:
    ours = [line for line in output.splitlines() if ERROR_LINE.match(line)]
    assert len(ours) == 1 and expect in ours[0], output[-4000:]
    assert "vlmtune/" not in "".join(re.findall(r'File "([^"]+)"', output)), "a traceback from vlmtune"
    assert elapsed < 120, f"took {elapsed:.0f} s"


@pytest.mark.parametrize("kind", ["config_error", "bad_model_directory"])
def test_torchrun_two_ranks_stop_together(corpus, kind):
    if kind == "config_error":
        cfg = train_config(corpus, os.path.join(corpus["root"], "tr_cfg"), optim={"lr": "fast"})
        expect = "optim.lr: expected float"
    else:
        model = _variant(corpus, "torchrun_bad", _config_edit(lambda c: c.pop("vision_config")))
        cfg = train_config(corpus, os.path.join(corpus["root"], "tr_model"), model={"init_from_hf": model})
        expect = "missing required key 'vision_config'"
    path = write_config(os.path.join(corpus["root"], f"torchrun_{kind}.yaml"), cfg)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(_free_port()), "-m", "vlmtune.cli", "train", path],
        env=cli_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode != 0
    _assert_one_message(proc.stdout + proc.stderr, expect, time.perf_counter() - start)
    assert "exitcode  : 2" in proc.stderr  # torchrun's own report names our exit status


def _two_ranks(argv: list[str], port: int) -> tuple[list[int], list[str]]:
    """`vlmtune argv` as ranks 0 and 1 of a world of two (the environment torchrun sets, without its agent)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vlmtune.cli", *argv],
            env={
                **cli_env(),
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], outputs


def test_a_file_only_one_rank_misses_stops_both_ranks(corpus, mixed_run):
    """Rank 1's per-rank checkpoint state is missing, rank 0's is there: without agreement rank 0 would wait
    in the checkpoint load's collective for ever. Launched without torchrun, whose agent would kill it."""
    run = os.path.join(corpus["root"], "two_ranks")
    _linked_copy(os.path.join(mixed_run[0], "checkpoints"), os.path.join(run, "checkpoints"))
    step = _step(run)
    meta = json.load(open(os.path.join(step, "meta.json")))
    meta.update(
        world_size=2, dp_size=2, dp_rank_of_rank=[0, 1]
    )  # as if saved by two ranks, rank 1's file lost
    _replace_file(os.path.join(step, "meta.json"), json.dumps(meta).encode())
    cfg = train_config(corpus, run, train={"epochs": 0, "train_iters": 99, "global_batch_tokens": 2 * MICRO})
    codes, outputs, elapsed = _two_rank_train(
        write_config(os.path.join(corpus["root"], "two_ranks.yaml"), cfg)
    )
    assert codes == [2, 2], outputs
    assert all("Traceback" not in o for o in outputs), outputs
    _assert_one_message("".join(outputs), "rank 1: ", elapsed)
    assert "rank_00001.pt: missing" in outputs[0]  # rank 0 prints rank 1's problem


def test_a_bad_sample_one_rank_decodes_stops_both_ranks(corpus):
    """`on_bad_sample: error` and a truncated JPEG that only one rank's micro-batch holds (found while
    decoding, in a DataLoader worker): the step's agreement stops both ranks before the forward."""
    _prerequisites(corpus)
    out = os.path.join(corpus["root"], "two_ranks_decode")
    cfg = train_config(corpus, out, data={"dataset": "truncated.jsonl", "on_bad_sample": "error"},
                       train={"epochs": 0, "train_iters": 2, "global_batch_tokens": 2 * MICRO})  # fmt: skip
    codes, outputs, elapsed = _two_rank_train(write_config(os.path.join(corpus["root"], "decode.yaml"), cfg))
    assert codes == [2, 2], outputs
    assert all("Traceback" not in o for o in outputs), outputs
    _assert_one_message("".join(outputs), "line 2: corrupt_image", elapsed)


def _two_rank_train(config: str) -> tuple[list[int], list[str], float]:
    for _ in range(3):  # another job on this machine may take the free port first: try another
        start = time.perf_counter()
        codes, outputs = _two_ranks(["train", config], _free_port())
        if "Address already in use" not in "".join(outputs):
            break
    return codes, outputs, time.perf_counter() - start
