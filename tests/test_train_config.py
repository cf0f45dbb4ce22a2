"""Every config error path names the key and what is allowed; overrides and --help."""

from __future__ import annotations

import pytest
import yaml

from vlmtune.cli import main
from vlmtune.errors import ConfigError
from vlmtune.train.config import describe_keys, from_dict, load


def base(tmp_path) -> dict:
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    return {
        "output_dir": str(tmp_path / "run"),
        "model": {"init_from_hf": str(tmp_path / "ckpt")},
        "data": {"dataset": "train.json"},
        "train": {"train_iters": 10},
    }


def test_valid_config_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base(tmp_path)))
    cfg = load(str(path), ["--optim.lr=3e-4", "--freeze.vision_encoder=true", "--loss.type=sample_mean"])
    assert cfg.optim.lr == 3e-4 and cfg.freeze.vision_encoder and cfg.loss.type == "sample_mean"
    assert cfg.train.train_iters == 10 and cfg.data.dataset == ["train.json"]
    assert cfg.to_dict()["optim"]["lr"] == 3e-4


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"bogus": {}}, "bogus: unknown section"),
        ({"optim": {"learning_rate": 1}}, "optim.learning_rate: unknown key; allowed: lr,"),
        ({"optim": {"lr": "fast"}}, "optim.lr: expected float"),
        ({"freeze": {"text_decoder": "yes"}}, "freeze.text_decoder: expected bool"),
        ({"train": {"train_iters": 1.5}}, "train.train_iters: expected int"),
        (
            {"loss": {"type": "mean"}},
            "loss.type: 'mean' is not one of token_mean, sample_mean, microbatch_mean",
        ),
        (
            {"model": {"activation_checkpointing": "some"}},
            "model.activation_checkpointing: 'some' is not one of",
        ),
        ({"optim": {"schedule": "step"}}, "optim.schedule: 'step' is not one of"),
        ({"train": {"mixed_precision": "fp16"}}, "train.mixed_precision: 'fp16' is not one of"),
        ({"train": {"on_nan": "ignore"}}, "train.on_nan"),
        ({"train": {"train_iters": 0}}, "set exactly one of them"),
        ({"train": {"train_iters": 5, "epochs": 1}}, "set exactly one of them"),
        (
            {"train": {"train_iters": 5, "global_batch_tokens": 10, "global_batch_samples": 2}},
            "set at most one",
        ),
        (
            {"train": {"train_iters": 5, "micro_batch_tokens": 0}},
            "train.micro_batch_tokens: must be positive",
        ),
        ({"train": {"train_iters": 5, "global_batch_tokens": 100}}, "at least train.micro_batch_tokens"),
        (
            {"freeze": {"vision_encoder": True, "vision_projector": True, "text_decoder": True}},
            "nothing to train",
        ),
        ({"optim": {"lr": 0}}, "optim.lr: must be positive"),
        ({"optim": {"vision_encoder_lr": -1.0}}, "optim.vision_encoder_lr"),
        ({"optim": {"betas": [0.9]}}, "optim.betas: expected two numbers"),
        ({"optim": {"warmup_steps": 5, "warmup_fraction": 0.1}}, "set at most one"),
        ({"optim": {"warmup_fraction": 1.5}}, "optim.warmup_fraction"),
        ({"optim": {"min_lr": 1.0}}, "optim.min_lr: must be in"),
        ({"optim": {"clip_grad": -1.0}}, "optim.clip_grad"),
        ({"loss": {"chunk_size": 0}}, "loss.chunk_size: must be positive"),
        ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last >= 1"),
        ({"checkpoint": {"load": "/no/such/ckpt"}}, "checkpoint.load: '/no/such/ckpt' does not exist"),
        ({"logging": {"log_interval": 0}}, "logging.log_interval: must be >= 1"),
        ({"eval": {"interval": -1}}, "eval.interval"),
        (
            {"model": {"dtype": "bfloat16"}, "train": {"train_iters": 1, "mixed_precision": "bf16"}},
            "model.dtype",
        ),
        ({"output_dir": ""}, "output_dir: required"),
        ({"model": {"init_from_hf": ""}}, "model.init_from_hf: required"),
        ({"model": {"init_from_hf": "/nonexistent"}}, "model.init_from_hf: no config.json"),
        ({"optim": 3}, "optim: expected a mapping"),
        ({"data": {"datasets": "x.json"}}, "data.datasets: unknown key"),
    ],
)
def test_config_errors_name_the_key(tmp_path, patch, message):
    raw = base(tmp_path)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    with pytest.raises(ConfigError, match=None) as e:
        from_dict(raw)
    assert message in str(e.value)


def test_data_section_is_checked_like_every_section(tmp_path):
    raw = base(tmp_path)
    raw["data"]["val_ratio"] = 2.0
    with pytest.raises(ConfigError, match="data.val_ratio"):
        from_dict(raw)
    raw["data"]["val_ratio"] = "a lot"
    with pytest.raises(ConfigError, match="data.val_ratio: expected float"):
        from_dict(raw)
    raw["data"]["val_ratio"] = 0.0
    for removed, instead in (("max_tokens", 8192), ("seed", 1)):  # one budget and one seed per run: train.*
        with pytest.raises(ConfigError, match=f"data.{removed}: unknown key"):
            from_dict({**raw, "data": {**raw["data"], removed: instead}})


def test_file_and_override_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load(str(bad))
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base(tmp_path)))
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        load(str(good), ["--optim.lr"])
    with pytest.raises(ConfigError, match="optim.nope: unknown key"):
        load(str(good), ["--optim.nope=1"])


def test_help_lists_every_key_with_default(capsys):
    text = describe_keys()
    for key in ("init_from_hf", "activation_checkpointing", "vision_projector", "vision_encoder_lr", "clip_grad",
                "warmup_fraction", "global_batch_tokens", "micro_batch_tokens", "mixed_precision", "chunk_size",
                "no_load_optim", "no_load_rng", "no_save_optim", "no_save_rng", "keep_last", "save_hf",
                "tensorboard", "log_interval", "dataset_dir", "max_samples", "on_bad_sample", "video_fps"):  # fmt: skip
        assert f"  {key}: " in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "no_save_rng: false" in capsys.readouterr().out


def test_cli_reports_config_error(tmp_path, capsys):
    raw = base(tmp_path)
    raw["optim"] = {"lr": "x"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 2
    assert "optim.lr: expected float" in capsys.readouterr().err
