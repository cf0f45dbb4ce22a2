"""The `lora:` config section and how a training model gets its adapters.

`LoraSetup` is handed to the model builder (train/build.py): `apply(model)` runs on the meta-built model
after tensor parallelism and before FSDP (adapters added, their TP placements, every base weight frozen and
cast to the compute dtype); `after_load(model)` runs once the base weights are loaded (adapters initialised
the same way on every layout, or read from `lora.init_from`). Base weights come from the HF checkpoint only,
adapters and `modules_to_save` only from the training checkpoint (which holds nothing else).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor.experimental import implicit_replication

from vlmtune.checkpoint.peft import from_peft_tensors, native_targets, read_adapter, spec_of
from vlmtune.errors import ConfigError
from vlmtune.models.qwen3_vl import ModelArgs, build_model
from vlmtune.models.qwen3_vl.lora import (
    ALL_LINEAR,
    GROUPS,
    KINDS,
    LoraSpec,
    add_adapters,
    initial_value,
    is_adapter,
    modules_named,
    placed,
    select_targets,
)
from vlmtune.options import option as _f
from vlmtune.parallel.lora_tp import apply_adapter_tensor_parallel

log = logging.getLogger(__name__)


@dataclass
class LoraConfig:
    rank: int = _f(0, "LoRA rank r; 0: full fine-tuning (no adapters)")
    alpha: float = _f(
        16.0, "the adapters' update is scaled by alpha / rank (alpha / sqrt(rank) with use_rslora)"
    )
    dropout: float = _f(0.0, "dropout on the adapters' input (must be 0 with expert or router targets)")
    targets: list = _f(
        ["all-linear"],
        "module kinds: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj router (decoder; MoE experts "
        "through gate_proj+up_proj and down_proj), qkv proj fc1 fc2 (vision); all-linear: every kind but router",
    )
    text_decoder: bool = _f(True, "put adapters on the targeted kinds of the decoder layers")
    vision_encoder: bool = _f(False, "put adapters on the targeted kinds of the vision blocks")
    vision_projector: bool = _f(False, "put adapters on fc1/fc2 of the merger and the DeepStack mergers")
    modules_to_save: list = _f(
        [], "modules trained whole beside the adapters, by name or suffix (merger, lm_head)"
    )
    use_rslora: bool = _f(False, "rank-stabilised scaling: alpha / sqrt(rank)")
    init_from: str = _f(
        "", "PEFT adapter directory to continue from (its rank, alpha and targets must match)"
    )
    base_quant: str = _f(
        "none", "frozen decoder Linears: none (compute dtype) or nf4 (QLoRA, torchao NF4)", ("none", "nf4")
    )


def kinds_of(cfg: LoraConfig) -> tuple[str, ...]:
    return tuple(dict.fromkeys(k for t in cfg.targets for k in (ALL_LINEAR if t == "all-linear" else (t,))))


def groups_of(cfg: LoraConfig) -> tuple[str, ...]:
    return tuple(g for g in GROUPS if getattr(cfg, g))


def spec_from(cfg: LoraConfig) -> LoraSpec:
    return LoraSpec(cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora)


def validate_lora(cfg, *, check_paths: bool = True) -> None:
    """The config-only checks of the `lora:` section (train/config.py's `validate` runs them)."""
    lo = cfg.lora
    if lo.rank < 0:
        raise ConfigError("lora.rank: must be >= 0 (0: no LoRA)")
    if lo.rank == 0:
        if lo.base_quant != "none" or lo.init_from:
            raise ConfigError("lora.base_quant / lora.init_from: need lora.rank > 0")
        return
    unknown = [t for t in lo.targets if t not in (*KINDS, "all-linear")]
    if unknown or not lo.targets:
        raise ConfigError(
            f"lora.targets: unknown kind(s) {unknown or '(empty list)'}; allowed: {', '.join(KINDS)}, all-linear"
        )
    if lo.alpha <= 0 or not 0 <= lo.dropout < 1:
        raise ConfigError("lora.alpha > 0 and 0 <= lora.dropout < 1 required")
    if not groups_of(lo) and not lo.modules_to_save:
        raise ConfigError(
            "lora: text_decoder, vision_encoder and vision_projector all false leaves nothing to train"
        )
    for g in groups_of(lo):
        if getattr(cfg.freeze, g):
            raise ConfigError(
                f"freeze.{g}: true and lora.{g}: true contradict (LoRA freezes every base weight anyway; "
                f"set lora.{g}: false to keep adapters out of that group)"
            )
    p = cfg.parallel
    if lo.base_quant == "nf4" and (p.tp > 1 or p.pp > 1):
        raise ConfigError("lora.base_quant=nf4: not combined with parallel.tp or parallel.pp; use dp_shard")
    if check_paths and lo.init_from and not os.path.isfile(os.path.join(lo.init_from, "adapter_config.json")):
        raise ConfigError(f"lora.init_from: no adapter_config.json in {lo.init_from!r}")


def check_lora_model(cfg, args: ModelArgs):
    """Checks that need the model: what the targets select, expert fusion and dropout; returns the targets."""
    lo = cfg.lora
    if lo.rank == 0:
        return None
    model = build_model(args)  # meta: names only
    saved = resolve_modules(model, lo.modules_to_save)
    linears, experts = select_targets(model, kinds_of(lo), groups_of(lo), exclude=tuple(saved))
    kinds = set(kinds_of(lo))
    if experts and len(kinds & {"gate_proj", "up_proj"}) == 1:
        raise ConfigError(
            "lora.targets: MoE experts fuse gate_proj and up_proj into one gate_up_proj (one adapter, as peft "
            "writes it); target both or neither"
        )
    if args.tie_word_embeddings and "lm_head" in saved:
        raise ConfigError(
            "lora.modules_to_save: lm_head is tied to embed_tokens in this model; name embed_tokens"
        )
    routers = [n for n in linears if n.endswith(".mlp.gate")]
    if lo.dropout > 0 and (experts or routers):
        raise ConfigError(
            "lora.dropout: must be 0 with expert or router targets: peft adapts those through "
            "target_parameters, which has no dropout, so the exported adapter would not load"
        )
    if not linears and not experts and not saved:
        raise ConfigError(
            f"lora.targets {lo.targets} in groups {list(groups_of(lo))}: select no module of this model"
        )
    return linears, experts, saved


def resolve_modules(model: nn.Module, names: list[str]) -> list[str]:
    """`lora.modules_to_save` entries -> our module names (an entry names a module or a suffix of its name)."""
    found, unknown = modules_named(model, names)
    if unknown:
        raise ConfigError(
            f"lora.modules_to_save: {unknown} name no module; e.g. merger, deepstack_merger_list, lm_head, "
            "embed_tokens"
        )
    return found


class LoraSetup:
    """Adapters for one training model (see module docstring)."""

    def __init__(self, cfg, args: ModelArgs, *, seed: int, master_dtype, compute_dtype):
        self.cfg, self.spec, self.seed = cfg.lora, spec_from(cfg.lora), seed
        self.master_dtype, self.compute_dtype = master_dtype, compute_dtype
        self.linears, self.experts, self.saved = check_lora_model(cfg, args)
        whole = build_model(args)  # meta: the whole model's placement (a pipeline stage holds part of it)
        self.apply(whole)
        self.spec = placed(self.spec, whole, self.saved)  # what MFU and `vlmtune plan` count

    def apply(self, model: nn.Module) -> None:
        """Adapters on the (meta) model, their TP placements, base frozen in the compute dtype."""
        modules = dict(model.named_modules())
        linears = [n for n in self.linears if n in modules]  # a pipeline stage holds some layers only
        experts = {n: p for n, p in self.experts.items() if n in modules}
        add_adapters(model, linears, experts, self.spec, self.master_dtype)
        if getattr(model, "tp_mesh", None) is not None:
            apply_adapter_tensor_parallel(model, model.tp_mesh)
        for mname, module in model.named_modules():
            trained = any(mname == s or mname.startswith(s + ".") for s in self.saved)
            for pname, p in list(module.named_parameters(recurse=False)):
                train = trained or is_adapter(f"{mname}.{pname}")
                if not train and p.dtype != self.compute_dtype:
                    p = nn.Parameter(p.detach().to(self.compute_dtype))
                    setattr(module, pname, p)
                p.requires_grad_(train)
        model.tie_weights()

    def after_load(self, model: nn.Module) -> None:
        """Initialise every adapter (PEFT's default, or `lora.init_from`) once the base weights are loaded."""
        values = self._init_from(model) if self.cfg.init_from else {}
        with torch.no_grad(), implicit_replication():
            for name, p in model.named_parameters():
                if name in values:
                    p.copy_(values[name].to(p.dtype))
                elif is_adapter(name):
                    p.copy_(initial_value(name, tuple(p.shape), self.seed).to(p.dtype))

    def _init_from(self, model: nn.Module) -> dict[str, torch.Tensor]:
        path = self.cfg.init_from
        cfg, tensors = read_adapter(path)
        theirs = spec_of(cfg)
        if (theirs.rank, theirs.alpha, theirs.use_rslora) != (
            self.spec.rank,
            self.spec.alpha,
            self.spec.use_rslora,
        ):
            raise ConfigError(
                f"lora.init_from {path}: r={theirs.rank} lora_alpha={theirs.alpha} use_rslora={theirs.use_rslora}; "
                f"the lora: section says rank={self.spec.rank} alpha={self.spec.alpha} use_rslora={self.spec.use_rslora}"
            )
        _, experts = native_targets(cfg, tensors)
        values = from_peft_tensors(tensors, experts, model.args)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        missing, extra = sorted(trained - set(values)), sorted(set(values) - trained)
        stage = model.visual is None or len(model.language_model.layers) < model.args.text.num_hidden_layers
        extra = [n for n in extra if not stage or n in dict(model.named_parameters())]  # others: other stages
        if extra or missing:
            raise ConfigError(
                f"lora.init_from {path}: its adapters differ from lora.targets / modules_to_save: missing "
                f"{missing[:5]}, not trained here {extra[:5]}"
            )
        log.info("adapters initialised from %s", path)
        return values


def analytic_trainable(args: ModelArgs, setup: LoraSetup) -> int:
    """Trainable parameters from the model's dimensions: r x (in + out) per adapted Linear (the vision q/k/v
    share one A: r x (D + 3D)), r x (in + out) per expert and projection, plus the modules trained whole."""
    t, v, r = args.text, args.vision, setup.spec.rank
    dims = _linear_dims(args)
    total = 0
    for name in setup.linears:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("k_proj", "v_proj") and name.startswith("visual."):
            total += r * v.hidden_size  # B only: A is q_proj's
        else:
            d_in, d_out = dims(name)
            total += r * (d_in + d_out)
    per_proj = {"gate_up_proj": t.hidden_size + 2 * t.moe_intermediate_size,
                "down_proj": t.moe_intermediate_size + t.hidden_size}  # fmt: skip
    for projs in setup.experts.values():
        total += sum(t.num_experts * r * per_proj[p] for p in projs)
    return total + _saved_numel(args, setup.saved)


def _linear_dims(args: ModelArgs):
    t, v = args.text, args.vision
    merged = v.hidden_size * v.spatial_merge_size**2
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    table = {
        "self_attn.q_proj": (t.hidden_size, q), "self_attn.k_proj": (t.hidden_size, kv),
        "self_attn.v_proj": (t.hidden_size, kv), "self_attn.o_proj": (q, t.hidden_size),
        "mlp.gate_proj": (t.hidden_size, t.intermediate_size), "mlp.up_proj": (t.hidden_size, t.intermediate_size),
        "mlp.down_proj": (t.intermediate_size, t.hidden_size), "mlp.gate": (t.hidden_size, t.num_experts),
        "attn.q_proj": (v.hidden_size, v.hidden_size), "attn.proj": (v.hidden_size, v.hidden_size),
        "mlp.linear_fc1": (v.hidden_size, v.intermediate_size), "mlp.linear_fc2": (v.intermediate_size, v.hidden_size),
        "merger.linear_fc1": (merged, merged), "merger.linear_fc2": (merged, v.out_hidden_size),
    }  # fmt: skip

    def dims(name: str) -> tuple[int, int]:
        if ".deepstack_merger_list." in name or ".merger." in name:
            return table["merger." + name.rsplit(".", 1)[-1]]
        return table[".".join(name.split(".")[-2:])]

    return dims


def _saved_numel(args: ModelArgs, saved: list[str]) -> int:
    if not saved:
        return 0
    model = build_model(args)  # meta: shapes only
    modules = dict(model.named_modules())
    return sum(p.numel() for s in saved for p in modules[s].parameters())
