"""Hugging Face `config.json` (transformers 4.57 or 5.x form) -> plain dataclasses our modules read.

Only the keys the model needs are read; everything else in the source dict is kept verbatim in
`ModelArgs.hf_config` so `save_pretrained` can write the file back unchanged.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from vlmtune.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")


@dataclass
class VisionArgs:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: list[int]
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass
class TextArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    mrope_section: list[int]
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    hidden_act: str = "silu"
    mrope_interleaved: bool = True
    # MoE (qwen3_vl_moe); num_experts == 0 means every layer is dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0

    def is_sparse_layer(self, layer_idx: int) -> bool:
        if self.num_experts <= 0 or layer_idx in self.mlp_only_layers:
            return False
        return (layer_idx + 1) % self.decoder_sparse_step == 0


@dataclass
class ModelArgs:
    vision: VisionArgs
    text: TextArgs
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    model_type: str = "qwen3_vl"
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.text.num_experts > 0


_REQUIRED = object()


def _req(d: dict, key: str, where: str):
    if key not in d or d[key] is None:
        raise ConfigError(f"{where}: missing required key '{key}'")
    return d[key]


def _int(d: dict, key: str, where: str, default=_REQUIRED, low: int = 1) -> int:
    """An integer key (an integral float is accepted) of at least `low`; a missing one takes `default`."""
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"{where}: missing required key '{key}'")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(f"{where}: '{key}' is {value}; must be >= {low}")
    return int(value)


def _ints(d: dict, key: str, where: str) -> list[int]:
    value = d.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{where}: '{key}' must be a list of integers, got {value!r}")
    return list(value)


def _section(d: dict, key: str, where: str) -> dict:
    value = _req(d, key, where)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must be a JSON object, got {type(value).__name__}")
    return value


def _rope_fields(text: dict, where: str) -> tuple[float, list[int], bool]:
    """Read rope theta and mrope section from either `rope_parameters` (5.x) or `rope_scaling`+`rope_theta` (4.57)."""
    params = text.get("rope_parameters")
    scaling = text.get("rope_scaling")
    theta_top = text.get("rope_theta")
    if params is not None and scaling is not None and scaling != params:
        sec_a, sec_b = params.get("mrope_section"), scaling.get("mrope_section")
        if sec_a is not None and sec_b is not None and list(sec_a) != list(sec_b):
            raise ConfigError(
                f"{where}: 'rope_parameters.mrope_section' {sec_a} contradicts 'rope_scaling.mrope_section' {sec_b}"
            )
    src = params if params is not None else (scaling or {})
    src_name = "rope_parameters" if params is not None else "rope_scaling"
    theta = src.get("rope_theta", theta_top)
    if theta is None:
        raise ConfigError(f"{where}: missing 'rope_theta' (in '{src_name}' or at the top of text_config)")
    if theta_top is not None and float(theta_top) != float(theta):
        raise ConfigError(
            f"{where}: 'rope_theta' {theta_top} contradicts '{src_name}.rope_theta' {theta}; keep one of them"
        )
    rope_type = src.get("rope_type", src.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"{where}: '{src_name}.rope_type' is {rope_type!r}; only 'default' (mrope) is supported"
        )
    section = src.get("mrope_section")
    if section is None:
        raise ConfigError(f"{where}: missing '{src_name}.mrope_section'")
    if not src.get("mrope_interleaved", True):
        raise ConfigError(
            f"{where}: '{src_name}.mrope_interleaved' is false; Qwen3-VL uses interleaved MRoPE"
        )
    return float(theta), [int(s) for s in section], True


def _num_experts(t: dict, where: str) -> int:
    """4.57 and hub configs say `num_experts`; transformers 5 saves `num_local_experts`."""
    a, b = t.get("num_experts"), t.get("num_local_experts")
    if a is not None and b is not None and int(a) != int(b):
        raise ConfigError(f"{where}: 'num_experts' {a} contradicts 'num_local_experts' {b}")
    if a is None and b is None:
        raise ConfigError(f"{where}: missing required key 'num_experts' (or 'num_local_experts')")
    return int(a if a is not None else b)


def _check_moe(text: TextArgs, where: str) -> None:
    if text.num_experts < 1:
        raise ConfigError(f"{where}: 'num_experts' is {text.num_experts}; must be >= 1")
    if not 1 <= text.num_experts_per_tok <= text.num_experts:
        raise ConfigError(
            f"{where}: 'num_experts_per_tok' {text.num_experts_per_tok} must be in [1, num_experts={text.num_experts}]"
        )
    if text.moe_intermediate_size < 1:
        raise ConfigError(f"{where}: 'moe_intermediate_size' is {text.moe_intermediate_size}; must be >= 1")
    if text.decoder_sparse_step < 1:
        raise ConfigError(f"{where}: 'decoder_sparse_step' is {text.decoder_sparse_step}; must be >= 1")
    bad = [i for i in text.mlp_only_layers if not 0 <= i < text.num_hidden_layers]
    if bad:
        raise ConfigError(
            f"{where}: 'mlp_only_layers' {bad} outside [0, num_hidden_layers={text.num_hidden_layers})"
        )
    if not text.norm_topk_prob:
        # transformers (4.57 and 5.x) never reads the flag for this model: weights trained with it renormalised.
        warnings.warn(
            f"{where}: 'norm_topk_prob' is false, but Qwen3-VL-MoE always renormalises the top-k router weights "
            "(as transformers does); the flag is ignored",
            stacklevel=3,
        )


def _text_args(t: dict, tw: str, is_moe: bool) -> TextArgs:
    theta, section, interleaved = _rope_fields(t, tw)
    n_heads = _int(t, "num_attention_heads", tw)
    hidden = _int(t, "hidden_size", tw)
    head_dim = _int(t, "head_dim", tw, default=hidden // n_heads)
    if sum(section) != head_dim // 2:
        raise ConfigError(f"{tw}: mrope_section {section} must sum to head_dim/2 = {head_dim // 2}")
    text = TextArgs(
        vocab_size=_int(t, "vocab_size", tw),
        hidden_size=hidden,
        intermediate_size=_int(t, "intermediate_size", tw),
        num_hidden_layers=_int(t, "num_hidden_layers", tw),
        num_attention_heads=n_heads,
        num_key_value_heads=_int(t, "num_key_value_heads", tw, default=n_heads),
        head_dim=head_dim,
        rope_theta=theta,
        mrope_section=section,
        mrope_interleaved=interleaved,
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        attention_bias=bool(t.get("attention_bias", False)),
        hidden_act=t.get("hidden_act", "silu"),
        num_experts=_num_experts(t, tw) if is_moe else 0,
        num_experts_per_tok=_int(t, "num_experts_per_tok", tw, low=0) if is_moe else 0,
        moe_intermediate_size=_int(t, "moe_intermediate_size", tw, low=0) if is_moe else 0,
        decoder_sparse_step=_int(t, "decoder_sparse_step", tw, default=1, low=0),
        mlp_only_layers=_ints(t, "mlp_only_layers", tw),
        norm_topk_prob=bool(t.get("norm_topk_prob", True)),
        router_aux_loss_coef=float(t.get("router_aux_loss_coef", 0.001 if is_moe else 0.0)),
    )
    if is_moe:
        _check_moe(text, tw)
    if text.hidden_act != "silu":
        raise ConfigError(f"{tw}: 'hidden_act' {text.hidden_act!r} is not supported (Qwen3-VL uses 'silu')")
    if text.num_attention_heads % text.num_key_value_heads:
        raise ConfigError(
            f"{tw}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {text.num_key_value_heads}"
        )
    return text


def _vision_args(v: dict, vw: str, text: TextArgs) -> VisionArgs:
    v_rope = v.get("rope_parameters") or {}
    vision = VisionArgs(
        depth=_int(v, "depth", vw),
        hidden_size=_int(v, "hidden_size", vw),
        intermediate_size=_int(v, "intermediate_size", vw),
        num_heads=_int(v, "num_heads", vw),
        out_hidden_size=_int(v, "out_hidden_size", vw),
        num_position_embeddings=_int(v, "num_position_embeddings", vw),
        deepstack_visual_indexes=_ints(v, "deepstack_visual_indexes", vw),
        in_channels=_int(v, "in_channels", vw, default=3),
        patch_size=_int(v, "patch_size", vw, default=16),
        temporal_patch_size=_int(v, "temporal_patch_size", vw, default=2),
        spatial_merge_size=_int(v, "spatial_merge_size", vw, default=2),
        hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
        rope_theta=float(v_rope.get("rope_theta", 10000.0)),
    )
    if vision.hidden_size % vision.num_heads:
        raise ConfigError(
            f"{vw}: 'hidden_size' {vision.hidden_size} is not a multiple of 'num_heads' {vision.num_heads}"
        )
    if vision.out_hidden_size != text.hidden_size:
        raise ConfigError(
            f"{vw}: 'out_hidden_size' {vision.out_hidden_size} must equal text_config.hidden_size {text.hidden_size}"
        )
    side = int(round(vision.num_position_embeddings**0.5))
    if side * side != vision.num_position_embeddings:
        raise ConfigError(f"{vw}: 'num_position_embeddings' {vision.num_position_embeddings} is not a square")
    bad = [i for i in vision.deepstack_visual_indexes if not 0 <= i < vision.depth]
    if bad:
        raise ConfigError(f"{vw}: 'deepstack_visual_indexes' {bad} outside [0, depth={vision.depth})")
    if len(vision.deepstack_visual_indexes) > text.num_hidden_layers:
        raise ConfigError(f"{vw}: more deepstack indexes than text decoder layers")
    if vision.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
        raise ConfigError(f"{vw}: 'hidden_act' {vision.hidden_act!r} is not supported")
    return vision


def args_from_hf_dict(cfg: dict[str, Any], where: str = "config.json") -> ModelArgs:
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{where}: 'model_type' is {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}")
    t = _section(cfg, "text_config", where)
    v = _section(cfg, "vision_config", where)
    try:
        text = _text_args(t, f"{where} text_config", model_type == "qwen3_vl_moe")
        vision = _vision_args(v, f"{where} vision_config", text)
    except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong kind the checks above let by
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: malformed value ({e})") from None
    # 5.x keeps tie_word_embeddings at the top; 4.57 checkpoints may carry it in text_config only.
    tie = cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
    ids = {
        key: _int(cfg, key, where, default=default, low=0)
        for key, default in (
            ("image_token_id", 151655),
            ("video_token_id", 151656),
            ("vision_start_token_id", 151652),
            ("vision_end_token_id", 151653),
        )
    }
    for key, value in ids.items():
        if value >= text.vocab_size:
            raise ConfigError(
                f"{where}: '{key}' {value} is outside the vocabulary (vocab_size {text.vocab_size})"
            )
    return ModelArgs(
        vision=vision,
        text=text,
        **ids,
        tie_word_embeddings=bool(tie),
        model_type=model_type,
        hf_config=copy.deepcopy(cfg),
    )


def load_config(path: str | os.PathLike) -> ModelArgs:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ConfigError(f"{file}: not found; expected a Hugging Face Qwen3-VL checkpoint directory")
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: unreadable ({e})") from None
    return args_from_hf_dict(cfg, where=file)
