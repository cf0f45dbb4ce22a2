"""Round trip of meaning for `vlmtune config import-mindspeed`: for every key it maps, changing the source
value in a MindSpeed-MM fixture changes the imported vlmtune value accordingly."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest

from test_mindspeed_import import (
    ABSENT,
    BP,
    D8,
    D30,
    DELETE,
    EXPECTED,
    FIXTURES,
    FSDP,
    LORA,
    M8,
    M30,
    PP,
    S8,
    S30,
    Y8,
    Y30,
    YBP,
    apply_edits,
)  # fmt: skip
from vlmtune.train.mindspeed import import_mindspeed
from vlmtune.train.mindspeed_keys import DIRECT


@dataclass
class Case:
    source: str  # canonical MindSpeed-MM key whose meaning is checked
    entry: str  # the file imported
    edits: list  # (file, old text, new text) for scripts, (file, dotted key, value) for YAML/JSON
    target: str
    expected: object


def sh(source, entry, old, new, target, expected):
    return Case(source, entry, [(entry, old, new)], target, expected)


def one(source, entry, file, key, value, target, expected):
    return Case(source, entry, [(file, key, value)], target, expected)


CASES = [
    sh("args.lr", S8, "--lr 5.0e-6", "--lr 3.0e-4", "optim.lr", 3e-4),
    sh("args.min_lr", S8, "--min-lr 1.0e-7", "--min-lr 0", "optim.min_lr", 0.0),
    sh("args.weight_decay", S8, "--weight-decay 0.01", "--weight-decay 0.2", "optim.weight_decay", 0.2),
    sh("args.clip_grad", S8, "--clip-grad 0.0", "--clip-grad 2.5", "optim.clip_grad", 2.5),
    sh("args.lr_warmup_fraction", S8, "--lr-warmup-fraction 0.05", "--lr-warmup-fraction 0.2", "optim.warmup_fraction", 0.2),
    sh("args.lr_warmup_iters", S30, "--lr-warmup-iters 40", "--lr-warmup-iters 3", "optim.warmup_steps", 3),
    sh("args.adam_eps", S30, "--adam-eps 1.0e-6", "--adam-eps 1.0e-9", "optim.eps", 1e-9),
    sh("args.adam_beta1", S8, "--adam-beta1 0.9", "--adam-beta1 0.8", "optim.betas", [0.8, 0.98]),
    sh("args.adam_beta2", S8, "--adam-beta2 0.98", "--adam-beta2 0.9", "optim.betas", [0.9, 0.9]),
    sh("args.lr_decay_style", S8, "--lr-decay-style cosine", "--lr-decay-style linear", "optim.schedule", "linear"),
    sh("args.train_iters", S8, "--train-iters 3000", "--train-iters 77", "train.train_iters", 77),
    sh("args.seed", S8, "--seed 1234", "--seed 5", "train.seed", 5),
    sh("args.save_interval", S8, "--save-interval 1000", "--save-interval 3", "checkpoint.save_interval", 3),
    sh("args.log_interval", S8, "--log-interval 5", "--log-interval 2", "logging.log_interval", 2),
    sh("args.eval_interval", S8, "--eval-interval 500", "--eval-interval 50", "eval.interval", 50),
    sh("args.eval_iters", S8, "--eval-iters 20", "--eval-iters 3", "eval.max_samples", 3 * 8),
    sh("args.tensor_model_parallel_size", S8, "TP=1", "TP=2", "parallel.tp", 2),
    sh("args.pipeline_model_parallel_size", S8, "PP=4", "PP=2", "parallel.pp", 2),
    sh("args.context_parallel_size", S8, "CP=1", "CP=2", "parallel.cp", 2),
    sh("args.micro_batch_size", S8, "MBS=1", "MBS=3", "train.micro_batch_tokens", 3 * 2048),
    sh("args.seq_length", S8, "SEQ_LEN=2048", "SEQ_LEN=512", "train.micro_batch_tokens", 512),
    sh("args.seq_length", S8, "SEQ_LEN=2048", "SEQ_LEN=512", "data.cutoff_len", 512),  # capped to fit
    sh("args.global_batch_size", S8, "GRAD_ACC_STEP=4", "GRAD_ACC_STEP=16", "train.global_batch_samples", 32),
    sh("args.global_batch_size", S8, "NNODES=1", "NNODES=2", "train.global_batch_samples", 16),
    sh("args.calculate_per_token_loss", S8, "--calculate-per-token-loss", "", "loss.type", "microbatch_mean"),
    sh("args.calculate_per_sample_loss", S8, "--calculate-per-token-loss", "--calculate-per-sample-loss",
       "loss.type", "sample_mean"),
    sh("args.bf16", S8, "--bf16 \\", "\\", "train.mixed_precision", ABSENT),
    sh("args.save", S8, 'SAVE_PATH="save_dir/qwen3vl_8b"', 'SAVE_PATH="/ckpt/run7"', "output_dir", "/ckpt/run7"),
    sh("args.num_workers", S8, "--num-workers 4", "--num-workers 1", "data.num_workers", 1),
    sh("args.moe_aux_loss_coeff", S8, "--bf16", "--bf16 --moe-aux-loss-coeff 0.02", "loss.aux_loss_coef", 0.02),
    sh("args.expert_model_parallel_size", S30, "--log-tps", "--log-tps --expert-model-parallel-size 4",
       "parallel.ep", 4),
    one("model.text_decoder.pipeline_num_layers", S8, M8, "text_decoder.pipeline_num_layers", [9, 9, 9, 9],
        "parallel.llm_pp_layers", [9, 9, 9, 9]),
    one("model.image_encoder.vision_encoder.pipeline_num_layers", S8, M8,
        "image_encoder.vision_encoder.pipeline_num_layers", [20, 7, 0, 0], "parallel.vit_pp_layers", [20, 7, 0, 0]),
    one("model.image_encoder.vision_encoder.freeze", S8, M8, "image_encoder.vision_encoder.freeze", False,
        "freeze.vision_encoder", False),
    one("model.image_encoder.vision_projector.freeze", S8, M8, "image_encoder.vision_projector.freeze", True,
        "freeze.vision_projector", True),
    one("model.text_decoder.freeze", S8, M8, "text_decoder.freeze", True, "freeze.text_decoder", True),
    one("model.text_decoder.recompute_granularity", S8, M8, "text_decoder.recompute_granularity", "selective",
        "model.activation_checkpointing", "selective"),
    Case("model.image_encoder.vision_encoder.recompute_granularity", S30,
         [(M30, "text_decoder.recompute_granularity", DELETE),
          (M30, "image_encoder.vision_encoder.recompute_granularity", "selective")],
         "model.activation_checkpointing", "selective"),
    one("model.init_from_hf_path", S8, M8, "init_from_hf_path", "/models/q8", "model.init_from_hf", "/models/q8"),
    Case("data.dataset_param.preprocess_parameters.model_name_or_path", S8,
         [(M8, "init_from_hf_path", DELETE), (D8, PP + "model_name_or_path", "/models/tok")],
         "model.init_from_hf", "/models/tok"),
    one("model.text_decoder.seq_length", S8, M8, "text_decoder.seq_length", 1536, "train.micro_batch_tokens", ABSENT),
    one("model.loss_cfg.chunk_size", S30, M30, "loss_cfg.chunk_size", 256, "loss.chunk_size", 256),
    one("model.loss_cfg.router_aux_loss_coef", S30, M30, "loss_cfg.router_aux_loss_coef", 0.01,
        "loss.aux_loss_coef", 0.01),
    one("model.loss_cfg.loss_type", S30, M30, "loss_cfg.loss_type", "per_token_loss", "loss.type", "token_mean"),
    one("model.loss_cfg.loss_type", S30, M30, "loss_cfg.loss_type", "default", "loss.type", "microbatch_mean"),
    one("data.dataset_param.basic_parameters.dataset", S8, D8, BP + "dataset", "a.json,b.jsonl", "data.dataset",
        "a.json,b.jsonl"),
    one("data.dataset_param.basic_parameters.dataset_dir", S8, D8, BP + "dataset_dir", "/data2", "data.dataset_dir",
        "/data2"),
    one("data.dataset_param.basic_parameters.cache_dir", S8, D8, BP + "cache_dir", "/tmp/c2", "data.cache_dir", "/tmp/c2"),
    one("data.dataset_param.basic_parameters.max_samples", S8, D8, BP + "max_samples", None, "data.max_samples", None),
    one("data.dataset_param.basic_parameters.train_on_prompt", S8, D8, BP + "train_on_prompt", True,
        "data.train_on_prompt", True),
    one("data.dataset_param.basic_parameters.mask_history", S8, D8, BP + "mask_history", True, "data.mask_history", True),
    one("data.dataset_param.basic_parameters.cutoff_len", S30, D30, BP + "cutoff_len", 2000, "data.cutoff_len", 2000),
    one("data.dataset_param.basic_parameters.cutoff_len", S30, D30, BP + "cutoff_len", 9000, "data.cutoff_len", 8192),
    one("data.dataset_param.basic_parameters.val_dataset", S8, D8, BP + "val_dataset", "./data/val.json",
        "data.val_dataset", "./data/val.json"),
    one("data.dataset_param.basic_parameters.val_rate", S8, D8, BP + "val_rate", 0.05, "data.val_ratio", 0.05),
    one("data.dataset_param.basic_parameters.template", Y8, Y8, YBP + "template", "qwen3_vl_nothink",
        "data.enable_thinking", False),
    one("data.dataset_param.basic_parameters.enable_thinking", Y8, Y8, YBP + "enable_thinking", False,
        "data.enable_thinking", False),
    one("data.dataset_param.preprocess_parameters.image_max_pixels", S8, D8, PP + "image_max_pixels", 65536,
        "data.image_max_pixels", 65536),
    one("data.dataset_param.preprocess_parameters.image_min_pixels", S8, D8, PP + "image_min_pixels", 1024,
        "data.image_min_pixels", 1024),
    one("data.dataset_param.preprocess_parameters.video_fps", S8, D8, PP + "video_fps", 0.5, "data.video_fps", 0.5),
    one("data.dataset_param.preprocess_parameters.video_maxlen", S8, D8, PP + "video_maxlen", 8,
        "data.video_max_frames", 8),
    one("data.dataset_param.preprocess_parameters.video_maxlen", S8, D8, PP + "video_maxlen", 8,
        "data.video_max_pixels", 65536 * 8),
    one("data.dataset_param.preprocess_parameters.video_max_pixels", S8, D8, PP + "video_max_pixels", 1024,
        "data.video_max_pixels", 1024 * 32),
    one("data.dataloader_param.shuffle", S8, D8, "dataloader_param.shuffle", False, "data.shuffle", False),
    one("data.dataloader_param.num_workers", Y30, Y30, "data.dataloader_param.num_workers", 2, "data.num_workers", 2),
    one("fsdp2.param_dtype", S30, FSDP, "param_dtype", "fp32", "train.mixed_precision", "fp32"),
    one("fsdp2.sharding_size", S30, FSDP, "sharding_size", 8, "parallel.dp_shard", 8),
    one("fsdp2.expert_parallel_size", S30, FSDP, "expert_parallel_size", 4, "parallel.ep", 4),
    one("args.no_load_optim", Y8, Y8, "gpt_args.no_load_optim", False, "checkpoint.no_load_optim", False),
    one("args.no_load_rng", Y8, Y8, "gpt_args.no_load_rng", False, "checkpoint.no_load_rng", False),
    one("args.no_save_optim", Y8, Y8, "gpt_args.no_save_optim", True, "checkpoint.no_save_optim", True),
    one("args.no_save_rng", Y8, Y8, "gpt_args.no_save_rng", False, "checkpoint.no_save_rng", False),
    one("args.lora_r", LORA, LORA, "lora_args.lora_r", 4, "lora.rank", 4),
    one("args.lora_alpha", LORA, LORA, "lora_args.lora_alpha", 8, "lora.alpha", 8),
    one("args.lora_dropout", LORA, LORA, "lora_args.lora_dropout", 0.1, "lora.dropout", 0.1),
    one("args.lora_target_modules", LORA, LORA, "lora_args.lora_target_modules", "gate_proj up_proj down_proj",
        "lora.targets", ["gate_proj", "up_proj", "down_proj"]),
    one("args.lora_target_modules", LORA, LORA, "lora_args.lora_target_modules", ["linear_qkv", "fc1"],
        "lora.targets", ["q_proj", "k_proj", "v_proj", "qkv", "fc1"]),
]  # fmt: skip
# Without --seq-length the model JSON's text_decoder.seq_length sets the token budget.
CASES[[c.source for c in CASES].index("model.text_decoder.seq_length")] = Case(
    "model.text_decoder.seq_length", S8,
    [(S8, "--seq-length ${SEQ_LEN} \\", "\\"), (M8, "text_decoder.seq_length", 1536)],
    "train.micro_batch_tokens", 1536,
)  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.source}->{c.target}")
def test_changing_a_source_value_changes_the_imported_value(tmp_path, case):
    shutil.copytree(FIXTURES, tmp_path, dirs_exist_ok=True)
    before, _ = import_mindspeed([str(tmp_path / case.entry)])
    apply_edits(tmp_path, case.edits)
    cfg, report = import_mindspeed([str(tmp_path / case.entry)])
    section, _, key = case.target.partition(".")
    value = cfg.get(section, {}).get(key, ABSENT) if key else cfg.get(section, ABSENT)
    old = before.get(section, {}).get(key, ABSENT) if key else before.get(section, ABSENT)
    assert value == case.expected if case.expected is not ABSENT else value is ABSENT
    assert value != old or (value is ABSENT) != (old is ABSENT)


def test_round_trip_cases_cover_every_mapped_key():
    mapped = {name for name, _, _ in DIRECT}
    for entry in EXPECTED:
        _, report = import_mindspeed([str(FIXTURES / entry)])
        mapped |= {s.name for m in report.mapped for s in m.sources}
    assert mapped <= {c.source for c in CASES}
