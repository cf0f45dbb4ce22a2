"""What `vlmtune config import-mindspeed` does with each MindSpeed-MM key: the one-to-one mappings
(`DIRECT`), the keys it does not map and why (`RULES`), and value conversion (`convert`).

Each rule matches canonical setting names (see `mindspeed_parse`) with shell-style wildcards; the first
matching rule decides. A rule with a reason ignores the key, or, when it lists accepted values, ignores it
only for those values; otherwise the key is unsupported and the rule says what to do. A key no rule matches
is unsupported as unknown to the importer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from vlmtune.errors import ConfigError
from vlmtune.train.mindspeed_parse import Setting

PP = "data.dataset_param.preprocess_parameters."
BP = "data.dataset_param.basic_parameters."
DL = "data.dataloader_param."
VISION = "model.image_encoder.vision_encoder."

# (source, vlmtune key, kind): one source key, one vlmtune key, the same meaning.
DIRECT = (
    ("args.lr", "optim.lr", "float"),
    ("args.min_lr", "optim.min_lr", "float"),
    ("args.weight_decay", "optim.weight_decay", "float"),
    ("args.adam_eps", "optim.eps", "float"),
    ("args.clip_grad", "optim.clip_grad", "float"),
    ("args.lr_warmup_fraction", "optim.warmup_fraction", "float"),
    ("args.lr_warmup_iters", "optim.warmup_steps", "int"),
    ("args.train_iters", "train.train_iters", "int"),
    ("args.seed", "train.seed", "int"),
    ("args.no_load_optim", "checkpoint.no_load_optim", "bool"),
    ("args.no_load_rng", "checkpoint.no_load_rng", "bool"),
    ("args.no_save_optim", "checkpoint.no_save_optim", "bool"),
    ("args.no_save_rng", "checkpoint.no_save_rng", "bool"),
    ("args.save_interval", "checkpoint.save_interval", "int"),
    ("args.log_interval", "logging.log_interval", "int"),
    ("args.eval_interval", "eval.interval", "int"),
    ("args.tensor_model_parallel_size", "parallel.tp", "int"),
    ("args.pipeline_model_parallel_size", "parallel.pp", "int"),
    ("args.expert_model_parallel_size", "parallel.ep", "int"),
    ("fsdp2.expert_parallel_size", "parallel.ep", "int"),
    ("model.text_decoder.pipeline_num_layers", "parallel.llm_pp_layers", "int_list"),
    (VISION + "pipeline_num_layers", "parallel.vit_pp_layers", "int_list"),
    (VISION + "freeze", "freeze.vision_encoder", "bool"),
    ("model.image_encoder.vision_projector.freeze", "freeze.vision_projector", "bool"),
    ("model.text_decoder.freeze", "freeze.text_decoder", "bool"),
    ("model.loss_cfg.chunk_size", "loss.chunk_size", "int"),
    ("model.loss_cfg.router_aux_loss_coef", "loss.aux_loss_coef", "float"),
    ("args.moe_aux_loss_coeff", "loss.aux_loss_coef", "float"),
    (DL + "num_workers", "data.num_workers", "int"),
    ("args.num_workers", "data.num_workers", "int"),
    (DL + "shuffle", "data.shuffle", "bool"),
    (BP + "dataset", "data.dataset", "str"),
    (BP + "dataset_dir", "data.dataset_dir", "str"),
    (BP + "cache_dir", "data.cache_dir", "str"),
    (BP + "max_samples", "data.max_samples", "int_or_none"),
    (BP + "train_on_prompt", "data.train_on_prompt", "bool"),
    (BP + "mask_history", "data.mask_history", "bool"),
    (BP + "val_dataset", "data.val_dataset", "str"),
    (BP + "val_rate", "data.val_ratio", "float"),
    (PP + "image_max_pixels", "data.image_max_pixels", "int"),
    (PP + "video_fps", "data.video_fps", "float"),
    (PP + "video_maxlen", "data.video_max_frames", "int"),
    ("args.lora_r", "lora.rank", "int"),
    ("args.lora_alpha", "lora.alpha", "number"),
    ("args.lora_dropout", "lora.dropout", "float"),
)
LOSS_TYPES = {"default": "microbatch_mean", "per_token_loss": "token_mean", "per_sample_loss": "sample_mean"}
SCHEDULES = ("cosine", "linear", "constant")
LORA_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "proj",
              "fc1", "fc2", "all-linear")  # fmt: skip
MEGATRON_LORA = {"linear_qkv": ("q_proj", "k_proj", "v_proj", "qkv"), "linear_proj": ("o_proj", "proj"),
                 "linear_fc1": ("gate_proj", "up_proj", "fc1"), "linear_fc2": ("down_proj", "fc2")}  # fmt: skip


@dataclass(frozen=True)
class Rule:
    pattern: str
    reason: str = ""  # why the key can be ignored ("": never)
    accept: tuple = ()  # ignored only for these values (empty: any value)
    todo: str = ""  # what to do when the key is not ignored


ARCH = "architecture: vlmtune reads it from the checkpoint's config.json (edit that file to change it)"
FUSED = "fused-kernel switch of Megatron / Ascend; vlmtune picks its kernels per device"
FLASH = "model.attn_implementation: auto already uses FlashAttention varlen on CUDA with bf16"
META = "vlmtune builds the model on the meta device and streams each rank's shard from the checkpoint"
MESSAGES = "a name of the messages format, which vlmtune reads as is (docs/data.md)"
TO_MESSAGES = (
    "vlmtune reads role/content messages with images/videos lists: convert the dataset (docs/data.md)"
)
RECOMPUTE = (
    "vlmtune recomputes every block (full), every second block (every_other) or the core attention "
    "(selective): choose model.activation_checkpointing"
)
NO_SP = "vlmtune has no sequence parallelism yet: leave it out (norm activations stay replicated under tp)"
LOADER = "vlmtune's loader packs samples into token-budget micro-batches and deals them to ranks itself"
OFF = "off, which is all vlmtune does"
ADAMW = ("adam", "adamw", "fused_adamw", "fused_torch_adamw", "torch_adamw")

RULES = (
    # GPT_ARGS / gpt_args flags
    Rule("args.use_mcore_models", "Megatron model-implementation switch; vlmtune has one implementation"),
    Rule(
        "args.context_parallel_algo",
        "parallel.cp is Ulysses, as ulysses_cp_algo",
        ("ulysses_cp_algo",),
        "ring attention (megatron_cp_algo, hybrid_cp_algo) is not built: parallel.cp is Ulysses "
        "(ulysses_cp_algo), up to the attention heads per tensor-parallel rank",
    ),
    Rule(
        "args.tokenizer_type",
        "Megatron tokenizer (NullTokenizer: none); the tokenizer is model.init_from_hf's",
    ),
    Rule("args.vocab_size", "the vocabulary comes from the checkpoint's config.json (no Megatron padding)"),
    Rule("args.make_vocab_size_divisible_by", "Megatron vocabulary padding; vlmtune does not pad it"),
    Rule("args.untie_embeddings_and_output_weights", ARCH + " (tie_word_embeddings)"),
    Rule("args.use_flash_attn", FLASH),
    Rule("args.use_fused_*", FUSED),
    Rule("args.no_*_fusion", FUSED),
    Rule("args.moe_grouped_gemm", FUSED),
    Rule(
        "args.moe_token_dispatcher_type", "Megatron's MoE token exchange; parallel.ep exchanges by all-to-all"
    ),
    Rule("args.moe_permutation_async_comm", "Megatron / Ascend overlap of the MoE token exchange"),
    Rule(
        "args.variable_seq_lengths", "vlmtune always packs variable-length samples (no padding to seq_length)"
    ),
    Rule(
        "args.use_distributed_optimizer", "FSDP2 already shards the optimizer state over data-parallel ranks"
    ),
    Rule("args.use_torch_fsdp2", "FSDP2 is vlmtune's data-parallel engine (parallel.dp_shard)"),
    Rule("args.ckpt_format", "vlmtune writes PyTorch DCP checkpoints; `vlmtune export` writes Hugging Face"),
    Rule(
        "args.optimizer_selection", "vlmtune trains with torch AdamW", ADAMW, "vlmtune trains with AdamW only"
    ),
    Rule("args.optimizer", "vlmtune trains with torch AdamW", ADAMW, "vlmtune trains with AdamW only"),
    Rule("args.use_cpu_initialization", META),
    Rule("args.init_model_with_meta_device", META),
    Rule("args.log_tps", "tokens/s and MFU are always logged (metrics.jsonl, TensorBoard)"),
    Rule("args.log_throughput", "tokens/s and MFU are always logged (metrics.jsonl, TensorBoard)"),
    Rule("args.mm_data", "names the data JSON (read when found; otherwise pass it as a further FILE)"),
    Rule("args.mm_model", "names the model JSON (read when found; otherwise pass it as a further FILE)"),
    Rule("args.mm_tool", "MindSpeed-MM tools.json (profiling and memory tools)"),
    Rule("args.distributed_backend", "NCCL on GPUs and gloo on CPU are chosen automatically"),
    Rule("args.ai_framework", "MindSpore / PyTorch backend switch; vlmtune is PyTorch"),
    Rule("args.use_deter_comp", "Ascend deterministic-computation switch"),
    Rule("args.tensorboard_dir", "TensorBoard events go to output_dir/tensorboard (logging.tensorboard)"),
    Rule("args.sequence_parallel", OFF, (False,), NO_SP),
    Rule("args.recompute_method", todo=RECOMPUTE),
    Rule("args.recompute_num_layers", todo=RECOMPUTE),
    Rule("args.fp16", OFF, (False,), "vlmtune computes in fp32 or bf16: set train.mixed_precision: bf16"),
    Rule(
        "args.virtual_pipeline_model_parallel_size",
        todo="set parallel.pp_schedule: interleaved and list pp x vpp stages in parallel.llm_pp_layers "
        "(rank r holds stages r, r + pp, ...; see docs/parallel.md)",
    ),
    Rule("args.calculate_square_loss", OFF, (False,), "no square loss: choose loss.type"),
    Rule("args.calculate_token_loss", OFF, (False,), "closest: loss.type: token_mean"),
    Rule("args.train_samples", todo="set train.train_iters (samples / global batch) or train.epochs"),
    Rule("args.lr_decay_*", todo="vlmtune decays over all train.train_iters steps; adjust optim.min_lr"),
    Rule("args.lora_register_forward_hook", "input-gradient hook for recomputation under LoRA; not needed"),
    Rule("args.lora_apply_modules", "all modules", (["all"], "all"), "restrict lora.targets instead"),
    Rule("args.lora_mixed_training", OFF, (False,), "train extra modules with lora.modules_to_save"),
    Rule(
        "args.lora_target_parameters",
        "none, which is all vlmtune does",
        ([], ""),
        "name module kinds in lora.targets",
    ),
    Rule("args.load_base_model", todo="set model.init_from_hf to the base model's Hugging Face directory"),
    Rule("args.num_layers", ARCH),
    Rule("args.hidden_size", ARCH),
    Rule("args.num_attention_heads", ARCH),
    Rule("args.normalization", ARCH),
    Rule("args.swiglu", ARCH),
    Rule("args.position_embedding_type", ARCH),
    # data JSON / data section
    Rule(
        "data.dataset_param.dataset_type",
        "MindSpeed-MM's JSON reader; vlmtune reads the files itself",
        ("huggingface",),
        TO_MESSAGES,
    ),
    Rule("data.*.use_fast_tokenizer", "vlmtune always uses the fast tokenizer (tokenizer.json)"),
    Rule("data.*.split_special_tokens", OFF, (False,), "vlmtune never splits special tokens"),
    Rule("data.*.overwrite_cache", "the length cache is checked on every run and rebuilt when stale"),
    Rule(
        "data.*.preprocessing_*", "vlmtune measures lengths from media headers and encodes in loader workers"
    ),
    Rule(
        "data.*.tool_format",
        "none, which is all vlmtune does",
        (None,),
        "no tool-call formatting: write tool calls into the messages",
    ),
    Rule("data.*.attr.images", MESSAGES, ("images",), TO_MESSAGES),
    Rule("data.*.attr.videos", MESSAGES, (None, "videos"), TO_MESSAGES),
    Rule("data.*.attr.messages", MESSAGES, ("messages",), TO_MESSAGES),
    Rule("data.*.attr.role_tag", MESSAGES, ("role",), TO_MESSAGES),
    Rule("data.*.attr.content_tag", MESSAGES, ("content",), TO_MESSAGES),
    Rule("data.*.attr.user_tag", MESSAGES, ("user",), TO_MESSAGES),
    Rule("data.*.attr.assistant_tag", MESSAGES, ("assistant",), TO_MESSAGES),
    Rule("data.*.attr.system_tag", MESSAGES, (None, "system"), TO_MESSAGES),
    Rule("data.*.attr.*", "not used by the messages format", (None,), TO_MESSAGES),
    Rule("data.dataloader_param.dataloader_mode", LOADER),
    Rule("data.dataloader_param.sampler_type", LOADER),
    Rule("data.dataloader_param.drop_last", LOADER),
    Rule(
        "data.dataloader_param.pin_memory", "the trainer moves each packed micro-batch to the device itself"
    ),
    Rule("data.dataloader_param.collate_param.model_name", "vlmtune has one collator (packed rows)"),
    Rule("data.dataloader_param.collate_param.ignore_pad_token_for_loss", "packed rows have no pad labels"),
    # model JSON / model section
    Rule("model.model_id", "dense or MoE comes from the checkpoint's config.json"),
    Rule("model.*token_id", "token ids come from the checkpoint's config.json"),
    Rule("model.*.attn_implementation", FLASH),
    Rule("model.*.attn_layout", "Ascend FlashAttention tensor layout (TND)"),
    Rule("model.*.synchronize_per_layer", "Ascend stream synchronisation per layer"),
    Rule("model.*.use_npu_fused_moe", "Ascend fused MoE kernel; vlmtune uses grouped GEMM on CUDA"),
    Rule("model.*.is_causal", "vlmtune's attention is causal within each packed sample"),
    Rule(
        "model.*.activation_offload",
        OFF,
        (False,),
        "no activation offloading: use activation checkpointing",
    ),
    Rule("model.*.recompute_method", todo=RECOMPUTE),
    Rule("model.*.recompute_num_layers", todo=RECOMPUTE),
    Rule("model.*.sequence_parallel", OFF, (False,), NO_SP),
    Rule("model.loss_cfg.compute_mode", "default loss computation", ("default",), "no counterpart"),
    Rule("model.patch.*", "MindSpeed-MM runtime patches (clip_grad_async, bridge_patch)"),
    Rule("model.text_encoder", "Qwen3-VL has no such encoder", (None,), ARCH),
    Rule("model.video_encoder", "Qwen3-VL has no such encoder", (None,), ARCH),
    Rule("model.text_decoder.*", ARCH),
    Rule("model.image_encoder.*", ARCH),
    # FSDP2 settings file
    Rule(
        "fsdp2.reduce_dtype", "gradients are reduced in fp32", ("fp32", "float32"), "vlmtune reduces in fp32"
    ),
    Rule("fsdp2.reshard_after_forward", "vlmtune reshards after forward", (True,), "no counterpart"),
    Rule("fsdp2.cast_forward_inputs", "vlmtune casts inputs to the compute dtype"),
    Rule("fsdp2.num_to_*_prefetch", "FSDP2 prefetch tuning; vlmtune uses torch's defaults"),
    Rule("fsdp2.offload_to_cpu", OFF, (False,), "vlmtune has no CPU offloading"),
    Rule("fsdp2.align_fsdp_param_groups", "Ascend alignment of FSDP parameter groups"),
    Rule("fsdp2.reshard_local_experts", "vlmtune shards experts over parallel.ep and FSDP2 itself"),
    Rule("fsdp2.moe_modules", "vlmtune shards experts over parallel.ep and FSDP2 itself"),
    # single YAML
    Rule("launch.*", "a launch setting, not a config key: see the launch command"),
    Rule("yaml.MM_TOOL_PATH", "MindSpeed-MM tools.json (profiling and memory tools)"),
    Rule("yaml.[A-Z]*", "YAML anchor holder: each use is mapped where it appears"),
)

UNKNOWN = "unknown to the importer: look up what it does and set the matching key (`vlmtune train --help`)"


def classify(name: str, value) -> tuple[bool, str]:
    """(ignored?, reason or what to do) for a setting no mapping rule used."""
    for rule in RULES:
        if fnmatchcase(name, rule.pattern):
            if rule.reason and (not rule.accept or any(_same(value, a) for a in rule.accept)):
                return True, rule.reason
            return False, rule.todo
    return False, UNKNOWN


def _same(value, accepted) -> bool:
    return type(value) is type(accepted) and value == accepted


# -------------------------------------------------------------------------------------------- values
_WHAT = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
         "int_or_none": "an integer or null", "int_list": "a list of integers", "number": "a number"}  # fmt: skip


def convert(s: Setting, kind: str):
    """The setting's value as `kind`, or ConfigError naming the file, the key and the value."""
    v = s.value
    if kind == "int_or_none" and (v is None or v in ("null", "None")):
        return None
    if kind == "int_list" and isinstance(v, list) and all(_is_int(x) for x in v):
        return [int(x) for x in v]
    if kind == "bool" and isinstance(v, bool):
        return v
    if kind == "bool" and isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    if kind in ("int", "int_or_none") and _is_int(v):
        return int(v)
    if kind == "number" and _is_int(v):
        return int(v)
    if kind in ("float", "number") and not isinstance(v, bool):
        try:
            return float(v)
        except (TypeError, ValueError):
            pass
    if kind == "str" and (v is None or v is True):  # a flag whose value expanded to nothing
        return ""
    if kind == "str" and isinstance(v, (str, int, float)) and not isinstance(v, bool):
        return str(v)
    raise ConfigError(f"{s.file}: {s.key} = {v!r}: expected {_WHAT[kind]}; fix the value")


def _is_int(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, float):
        return v.is_integer()
    return isinstance(v, int) or (isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v) is not None)
