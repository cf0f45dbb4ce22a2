"""Training config: one YAML file + dotted overrides -> validated dataclasses.

Every key has a default and a one-line help (`vlmtune train --help` prints them all). Validation runs
before anything starts: an unknown key, a wrong type or an impossible combination raises `ConfigError`
naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from dataclasses import dataclass, field

import torch
import yaml

from vlmtune.data.config import DataConfig
from vlmtune.errors import ConfigError
from vlmtune.generation.answers import DEFAULT_METRICS, METRICS
from vlmtune.options import build_section, check_type, describe_section
from vlmtune.options import option as _f
from vlmtune.parallel.fsdp import AC_MODES
from vlmtune.parallel.layout import ParallelConfig

from .lora import LoraConfig, validate_lora

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    init_from_hf: str = _f("", "Hugging Face checkpoint directory the run starts from (required)")
    dtype: str = _f("float32", "dtype the (sharded) master weights are stored in", ("float32", "bfloat16"))
    attn_implementation: str = _f(
        "auto", "attention kernel: FlashAttention varlen on CUDA bf16, SDPA with a mask otherwise", ("auto",)
    )
    activation_checkpointing: str = _f(
        "none",
        "recompute in backward: none; selective (the core attention of every layer, Megatron's meaning); "
        "every_other (every 2nd block whole); full (every block whole)",
        AC_MODES,
    )
    compile: bool = _f(
        False, "torch.compile each decoder layer and vision block (inductor on CUDA); off until measured"
    )


@dataclass
class FreezeConfig:
    vision_encoder: bool = _f(False, "freeze patch embedding, position table and vision blocks")
    vision_projector: bool = _f(False, "freeze the merger and all DeepStack mergers")
    text_decoder: bool = _f(False, "freeze token embeddings, decoder layers, final norm and lm_head")


@dataclass
class OptimConfig:
    lr: float = _f(1e-5, "peak learning rate (text decoder, and every group without its own lr)")
    vision_encoder_lr: float | None = _f(None, "peak lr for the vision encoder (null: optim.lr)")
    vision_projector_lr: float | None = _f(None, "peak lr for the vision projector (null: optim.lr)")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay (not applied to norms and biases)")
    betas: list = _f([0.9, 0.999], "AdamW betas [beta1, beta2]")
    eps: float = _f(1e-8, "AdamW epsilon")
    clip_grad: float = _f(1.0, "clip the global gradient norm to this value (0: no clipping)")
    schedule: str = _f("cosine", "learning-rate schedule after warmup", ("cosine", "linear", "constant"))
    warmup_steps: int = _f(0, "linear warmup steps (exclusive with warmup_fraction)")
    warmup_fraction: float = _f(0.0, "linear warmup as a fraction of all steps")
    min_lr: float = _f(0.0, "lr at the end of cosine/linear decay")


@dataclass
class TrainSection:
    train_iters: int = _f(0, "optimizer steps to run (exclusive with epochs)")
    epochs: float = _f(0.0, "epochs over the training set to run (exclusive with train_iters)")
    global_batch_tokens: int = _f(0, "tokens per optimizer step over all ranks; sets the accumulation")
    global_batch_samples: int = _f(0, "samples per optimizer step over all ranks (approximate: packed)")
    micro_batch_tokens: int = _f(4096, "token budget of one packed micro-batch")
    seed: int = _f(42, "seed for everything random: data order, validation split, mixing, dropout")
    mixed_precision: str = _f(
        "auto",
        "compute dtype: bf16 keeps float32 master weights and reductions; fp32 computes in model.dtype; "
        "auto = bf16 on CUDA (fp32 there only when set explicitly), fp32 on CPU",
        ("auto", "fp32", "bf16"),
    )
    on_nan: str = _f("skip", "non-finite loss or gradient: skip the step, or stop the run", ("skip", "stop"))
    device: str = _f("auto", "cuda when available, else cpu", ("auto", "cpu", "cuda"))


@dataclass
class LossConfig:
    type: str = _f(
        "token_mean",
        "token_mean: sum over the step's label tokens / their count over all micro-batches and ranks; "
        "sample_mean: mean per sample, then over the step's samples; "
        "microbatch_mean: mean per micro-batch, averaged (transformers' legacy behaviour)",
        ("token_mean", "sample_mean", "microbatch_mean"),
    )
    chunk_size: int = _f(1024, "label tokens per cross-entropy chunk (bounds the logits held at once)")
    aux_loss_coef: float | None = _f(
        None, "MoE router aux-loss coefficient (null: the checkpoint's router_aux_loss_coef)"
    )


@dataclass
class CheckpointConfig:
    save_interval: int = _f(0, "save a checkpoint every N steps (0: only at the end and on SIGTERM)")
    keep_last: int = _f(2, "checkpoints kept; older ones are removed after a new one is published")
    load: str = _f("", "checkpoint (step dir or run dir) to start from when output_dir has no checkpoint yet")
    auto_resume: bool = _f(True, "resume from output_dir/checkpoints/latest when it exists")
    no_load_optim: bool = _f(False, "do not load optimizer and scheduler state")
    no_load_rng: bool = _f(False, "do not load RNG states")
    no_save_optim: bool = _f(False, "do not save optimizer and scheduler state")
    no_save_rng: bool = _f(False, "do not save RNG states")
    save_hf: bool = _f(True, "export Hugging Face format to output_dir/hf at the end")
    save_on_sigterm: bool = _f(True, "on SIGTERM finish the step, save, and exit cleanly")


@dataclass
class LoggingConfig:
    log_interval: int = _f(1, "write metrics every N steps")
    tensorboard: bool = _f(True, "write TensorBoard events to output_dir/tensorboard")
    wandb: bool = _f(False, "log to Weights & Biases (needs `pip install wandb`)")
    wandb_project: str = _f("vlmtune", "W&B project name")
    progress_bar: bool = _f(True, "show a tqdm progress bar on rank 0")
    peak_tflops: float = _f(0.0, "device peak for MFU; 0: known GPU table, or a measured matmul on CPU")


@dataclass
class EvalConfig:
    interval: int = _f(0, "validation loss every N steps (0: only at the end, if there is a split)")
    max_samples: int = _f(0, "validate on at most this many samples (0: all)")
    generate: bool = _f(
        False, "at each validation also answer the validation prompts (greedy) and log eval.metrics"
    )
    max_new_tokens: int = _f(32, "answer length limit for eval.generate")
    metrics: list = _f(list(DEFAULT_METRICS), f"answer metrics for eval.generate: {', '.join(METRICS)}")
    batch_size: int = _f(8, "prompts a data-parallel rank generates together (eval.generate)")


SECTIONS = {
    "model": ModelConfig,
    "freeze": FreezeConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "train": TrainSection,
    "loss": LossConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "eval": EvalConfig,
    "parallel": ParallelConfig,
    "lora": LoraConfig,
}


@dataclass
class TrainConfig:
    output_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict:
        out = {"output_dir": self.output_dir}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out


# ----------------------------------------------------------------------------------------------------
def from_dict(raw: dict, *, check_paths: bool = True) -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    allowed = ("output_dir", *SECTIONS)
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{key}: unknown section; allowed: {', '.join(allowed)}")
    cfg = TrainConfig(output_dir=check_type("output_dir", raw.get("output_dir", ""), str))
    for name, cls in SECTIONS.items():
        setattr(cfg, name, build_section(name, cls, raw.get(name)))
    validate(cfg, check_paths=check_paths)
    cfg.train.mixed_precision = resolve_mixed_precision(cfg)
    return cfg


def resolve_mixed_precision(cfg: TrainConfig) -> str:
    """`train.mixed_precision: auto` -> bf16 on CUDA (float32 master weights), fp32 (compute in model.dtype)
    elsewhere. fp32 compute on CUDA runs attention on SDPA's math path, which holds `[heads, L, L]` scores
    per layer and runs out of memory at real lengths: it happens only when set explicitly, with a warning."""
    t = cfg.train
    cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    master_fp32 = cfg.model.dtype == "float32"
    if t.mixed_precision == "auto":
        return "bf16" if cuda and master_fp32 else "fp32"
    if t.mixed_precision == "fp32" and cuda and master_fp32:
        log.warning(
            "train.mixed_precision: fp32 on CUDA computes attention on the math path (no FlashAttention, "
            "[heads, L, L] scores per layer); expect out-of-memory at real lengths. Remove the key (auto: "
            "bf16) unless fp32 compute is what you want."
        )
    return t.mixed_precision


def validate(cfg: TrainConfig, *, check_paths: bool = True) -> None:
    """Cross-key checks: combinations that cannot run."""
    if not cfg.output_dir:
        raise ConfigError("output_dir: required (the directory everything the run writes goes to)")
    if not cfg.model.init_from_hf:
        raise ConfigError("model.init_from_hf: required (a Hugging Face Qwen3-VL checkpoint directory)")
    if check_paths and not os.path.exists(os.path.join(cfg.model.init_from_hf, "config.json")):
        raise ConfigError(f"model.init_from_hf: no config.json in {cfg.model.init_from_hf!r}")
    if not cfg.data.dataset:
        raise ConfigError("data.dataset: required (one or more comma-separated .json / .jsonl files)")
    t, o = cfg.train, cfg.optim
    if (t.train_iters > 0) == (t.epochs > 0):
        raise ConfigError("train.train_iters / train.epochs: set exactly one of them to a positive value")
    if t.train_iters < 0 or t.epochs < 0:
        raise ConfigError("train.train_iters / train.epochs: must not be negative")
    if t.global_batch_tokens > 0 and t.global_batch_samples > 0:
        raise ConfigError("train.global_batch_tokens / train.global_batch_samples: set at most one")
    if t.global_batch_tokens < 0 or t.global_batch_samples < 0:
        raise ConfigError("train.global_batch_tokens / train.global_batch_samples: must not be negative")
    if t.micro_batch_tokens <= 0:
        raise ConfigError("train.micro_batch_tokens: must be positive")
    if t.global_batch_tokens and t.global_batch_tokens < t.micro_batch_tokens:
        raise ConfigError("train.global_batch_tokens: must be at least train.micro_batch_tokens")
    if cfg.freeze.vision_encoder and cfg.freeze.vision_projector and cfg.freeze.text_decoder:
        raise ConfigError("freeze: all three groups frozen leaves nothing to train")
    if o.lr <= 0:
        raise ConfigError("optim.lr: must be positive")
    for key in ("vision_encoder_lr", "vision_projector_lr"):
        if getattr(o, key) is not None and getattr(o, key) < 0:
            raise ConfigError(f"optim.{key}: must be >= 0 or null")
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {o.betas!r}")
    if o.warmup_steps < 0 or not 0 <= o.warmup_fraction < 1:
        raise ConfigError("optim.warmup_steps >= 0 and 0 <= optim.warmup_fraction < 1 required")
    if o.warmup_steps > 0 and o.warmup_fraction > 0:
        raise ConfigError("optim.warmup_steps / optim.warmup_fraction: set at most one")
    if o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr: must be in [0, optim.lr={o.lr}]")
    if o.clip_grad < 0 or o.weight_decay < 0 or o.eps <= 0:
        raise ConfigError("optim.clip_grad >= 0, optim.weight_decay >= 0 and optim.eps > 0 required")
    if cfg.loss.aux_loss_coef is not None and cfg.loss.aux_loss_coef < 0:
        raise ConfigError("loss.aux_loss_coef: must be >= 0 or null")
    if cfg.loss.chunk_size <= 0:
        raise ConfigError("loss.chunk_size: must be positive")
    c = cfg.checkpoint
    if c.save_interval < 0 or c.keep_last < 1:
        raise ConfigError("checkpoint.save_interval >= 0 and checkpoint.keep_last >= 1 required")
    if check_paths and c.load and not os.path.exists(c.load):
        raise ConfigError(f"checkpoint.load: {c.load!r} does not exist")
    for key, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if getattr(cfg.logging, key) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"logging.{key}: true needs `pip install {module}` (or set it to false)")
    if cfg.logging.log_interval < 1:
        raise ConfigError("logging.log_interval: must be >= 1")
    if cfg.eval.interval < 0 or cfg.eval.max_samples < 0:
        raise ConfigError("eval.interval and eval.max_samples: must be >= 0")
    validate_generation(cfg)
    p = cfg.parallel
    for key in ("llm_pp_layers", "vit_pp_layers"):
        if not all(isinstance(n, int) and n >= 0 for n in getattr(p, key)):
            raise ConfigError(f"parallel.{key}: expected a list of non-negative integers")
    if t.mixed_precision == "bf16" and cfg.model.dtype == "bfloat16":
        raise ConfigError("model.dtype: keep float32 master weights with train.mixed_precision=bf16")
    validate_lora(cfg, check_paths=check_paths)


def validate_generation(cfg: TrainConfig) -> None:
    """`eval.generate` and its keys (pipeline parallelism is refused by the trainer's check_config)."""
    e = cfg.eval
    unknown = [m for m in e.metrics if m not in METRICS]
    if unknown or not e.metrics:
        raise ConfigError(
            f"eval.metrics: {unknown or e.metrics!r} not known; choose from {', '.join(METRICS)}"
        )
    if e.max_new_tokens < 1 or e.batch_size < 1:
        raise ConfigError("eval.max_new_tokens and eval.batch_size: must be >= 1")
    if e.generate and not (cfg.data.val_dataset or cfg.data.val_ratio):
        raise ConfigError(
            "eval.generate: true needs validation samples: set data.val_dataset or data.val_ratio"
        )


# ----------------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], object]:
    """`--section.key=value` (value parsed as YAML) -> (["section", "key"], value)."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r}: expected --section.key=value")
    key, value = body.split("=", 1)
    try:
        return key.split("."), yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: invalid YAML value ({e})") from None


def load(path: str, overrides: list[str] = (), *, check_paths: bool = True) -> TrainConfig:
    """YAML file + overrides -> validated config."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: config file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    return from_dict(raw, check_paths=check_paths)


def describe_keys() -> str:
    """Every key with its default and help, for `vlmtune train --help`."""
    lines = ["output_dir: (required) directory for checkpoints, metrics, TensorBoard, plots and hf/"]
    for name, cls in SECTIONS.items():
        lines.extend(describe_section(name, cls))
    return "\n".join(lines)
