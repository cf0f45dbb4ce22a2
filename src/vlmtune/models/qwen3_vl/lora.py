"""LoRA adapters on a built Qwen3-VL, applied from outside like tensor parallelism or FSDP (pure nn.Modules).

A targeted `nn.Linear` becomes a `LoRALinear` in place (its class is swapped, its parameters keep their names):
it gains the children `lora_A` (`[r, in]`) and `lora_B` (`[out, r]`) and returns
`base(x) + scale * lora_B(lora_A(dropout(x)))` with `scale = alpha / r` (or `alpha / sqrt(r)`, rsLoRA).
Because the adapters are computed inside the base Linear's forward, a tensor-parallel base hands them its
DTensor input unchanged (see parallel/lora_tp.py for their placements).

Checkpoints fuse the vision attention's q/k/v into one `qkv` Linear, and PEFT's adapter for it is one
`lora_A [r, D]` and one `lora_B [3D, r]`: our three Linears share q_proj's `lora_A` (k/v hold a reference, no
parameter of their own) and each has its third of `lora_B`, so the adapter converts exactly.

MoE experts (`Experts`, fused `gate_up_proj [E, H, 2I]` and `down_proj [E, I, H]`) become `LoRAExperts`: one
A/B pair per expert and projection, `{proj}_lora_A [E, in, r]` and `{proj}_lora_B [E, r, out]`, computed with
the same grouped GEMM as the experts (or one matmul per expert where none exists).

Module kinds (the `lora.targets` names) and the group each module belongs to:
    decoder  q_proj k_proj v_proj o_proj gate_proj up_proj down_proj  (text_decoder; in a sparse layer
             gate_proj+up_proj are the experts' fused gate_up_proj, down_proj their down_proj) and router
             (`mlp.gate` of a sparse layer)
    vision   qkv proj fc1 fc2 (vision_encoder blocks); merger and DeepStack mergers fc1 fc2 (vision_projector)
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .moe import Experts, _grouped_mm, grouped_mm_supported

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "router", "qkv", "proj",
         "fc1", "fc2")  # fmt: skip
ALL_LINEAR = tuple(k for k in KINDS if k != "router")  # the router is adapted only when named
GROUPS = ("vision_encoder", "vision_projector", "text_decoder")

# (module-name pattern, group, kind from the match)
_LINEARS = (
    (re.compile(r"language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"), "text_decoder", 1),
    (re.compile(r"language_model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)"), "text_decoder", 1),
    (re.compile(r"language_model\.layers\.\d+\.mlp\.gate"), "text_decoder", "router"),
    (re.compile(r"visual\.blocks\.\d+\.attn\.(q_proj|k_proj|v_proj)"), "vision_encoder", "qkv"),
    (re.compile(r"visual\.blocks\.\d+\.attn\.proj"), "vision_encoder", "proj"),
    (re.compile(r"visual\.blocks\.\d+\.mlp\.linear_(fc1|fc2)"), "vision_encoder", 1),
    (re.compile(r"visual\.(?:merger|deepstack_merger_list\.\d+)\.linear_(fc1|fc2)"), "vision_projector", 1),
)
_EXPERTS = re.compile(r"language_model\.layers\.\d+\.mlp\.experts")
EXPERT_KINDS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA run: the adapters' hyperparameters and, once `placed` on the model, where they sit.

    The placed fields are read off the model with its real adapters (`add_adapters`, freezing): FLOPs
    (train/flops.py), activation and memory plans and the trainer's MFU all read this one description.
    `adapter_params` and `saved_params` count parameters by `SITES` entry: the adapters, and the matmul
    weights of the modules trained whole (`modules_to_save`; biases and norms are additions, an embedding is
    a lookup)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    linears: frozenset[str] = frozenset()  # Linears with an adapter (module names)
    experts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # adapted experts -> their projections
    saved: tuple[str, ...] = ()  # modules trained whole
    adapter_params: dict[str, int] = field(default_factory=dict)
    saved_params: dict[str, int] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def trains(self, module: str) -> bool:
        """Whether `module`'s own weights train: it is (inside) a module trained whole."""
        return any(module == m or module.startswith(m + ".") for m in self.saved)


# What a parameter runs on: every decoder token, the experts (a token visits top_k / num_experts of them),
# every vision patch, every merged vision token (the mergers), every label token (lm_head).
SITES = ("decoder", "experts", "vision", "projector", "lm_head")


def site_of(module_name: str) -> str:
    """The `SITES` entry of a module of `Qwen3VL` by its name."""
    if module_name.startswith(("visual.merger", "visual.deepstack_merger_list")):
        return "projector"
    if module_name.startswith("visual."):
        return "vision"
    if module_name.startswith("lm_head"):
        return "lm_head"
    return "experts" if ".mlp.experts" in module_name else "decoder"


def placed(spec: LoraSpec, model: nn.Module, saved) -> LoraSpec:
    """`spec` placed on `model` (after `add_adapters` and freezing), `saved` the modules trained whole."""
    adapters, whole = dict.fromkeys(SITES, 0), dict.fromkeys(SITES, 0)
    linears, experts = set(), {}
    for mname, module in model.named_modules():
        if isinstance(module, LoRALinear):
            linears.add(mname)
        elif isinstance(module, LoRAExperts):
            experts[mname] = tuple(module.lora_projections)
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if is_adapter(f"{mname}.{pname}"):
                adapters[site_of(mname)] += p.numel()
            elif isinstance(module, (nn.Linear, Experts)) and p.ndim >= 2:  # a matmul's weight
                whole[site_of(mname)] += p.numel()
    return replace(
        spec, linears=frozenset(linears), experts=experts, saved=tuple(saved), adapter_params=adapters,
        saved_params=whole,
    )  # fmt: skip


def kind_of(name: str) -> tuple[str, str] | None:
    """(group, kind) of a Linear by its module name in `Qwen3VL`, or None when it is no LoRA target."""
    for pattern, group, kind in _LINEARS:
        m = pattern.fullmatch(name)
        if m:
            return group, kind if isinstance(kind, str) else m.group(kind)
    return None


def select_targets(
    model: nn.Module, kinds, groups, exclude: tuple[str, ...] = ()
) -> tuple[list[str], dict[str, list[str]]]:
    """The targets of `kinds` in `groups`: (Linear module names, {experts module name: [parameter names]}).

    Modules under an `exclude` prefix (modules trained whole, `modules_to_save`) get no adapters."""
    kinds, groups = set(kinds), set(groups)
    linears, experts = [], {}
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in exclude):
            continue
        if isinstance(module, nn.Linear):
            found = kind_of(name)
            if found and found[0] in groups and found[1] in kinds:
                linears.append(name)
        elif isinstance(module, Experts) and _EXPERTS.fullmatch(name) and "text_decoder" in groups:
            params = [p for p, ks in EXPERT_KINDS.items() if kinds & set(ks)]
            if params:
                experts[name] = params
    return linears, experts


def modules_named(model: nn.Module, entries) -> tuple[list[str], list[str]]:
    """(module names, unmatched entries): an entry names a module or a dotted suffix of its name (as peft's
    `modules_to_save`); a match inside another match is dropped."""
    modules = [n for n, _ in model.named_modules() if n]
    found, unknown = set(), []
    for entry in entries:
        hits = [n for n in modules if n == entry or n.endswith("." + entry)]
        found.update(hits)
        unknown += [] if hits else [entry]
    return sorted(n for n in found if not any(n.startswith(o + ".") for o in found)), unknown


class LoRALinear(nn.Linear):
    """`nn.Linear` + a low-rank update; created by `add_adapters` from an existing Linear (class swap)."""

    lora_scale: float
    lora_dropout: nn.Module

    def adapter_a(self) -> nn.Linear:
        shared = self.__dict__.get("_shared_lora_A")  # vision k/v: q_proj's A, not registered here
        return shared if shared is not None else self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + self.lora_B(self.adapter_a()(self.lora_dropout(x))) * self.lora_scale


class LoRAExperts(Experts):
    """`Experts` + one low-rank update per expert and targeted projection (see module docstring)."""

    lora_scale: float
    lora_projections: tuple[str, ...]

    def swiglu(self, rows, gate_up, down, counts, *, grouped):
        s = self.lora_scale

        def adapted(x, weight, proj):
            y = _per_expert_mm(x, weight, counts, grouped)
            if proj not in self.lora_projections:
                return y
            a, b = _local(getattr(self, f"{proj}_lora_A")), _local(getattr(self, f"{proj}_lora_B"))
            g = grouped and grouped_mm_supported(x, a, b)
            return (
                y + _per_expert_mm(_per_expert_mm(x, a.to(x.dtype), counts, g), b.to(x.dtype), counts, g) * s
            )

        gate, up = adapted(rows, gate_up, "gate_up_proj").chunk(2, dim=-1)
        return adapted(F.silu(gate) * up, down, "down_proj")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's experts of an expert-parallel (DTensor) parameter; the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _per_expert_mm(rows: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, grouped: bool) -> torch.Tensor:
    """`rows` grouped by expert (`counts[e]` consecutive rows) times each expert's `w[e]`."""
    if grouped:
        return _grouped_mm(rows, w, offs=counts.cumsum(0).to(torch.int32))
    parts = [r @ we for r, we in zip(rows.split(counts.tolist()), w.unbind(0))]
    return torch.cat(parts) if parts else rows.new_zeros(0, w.shape[-1])


def _linear_like(in_features: int, out_features: int, weight: torch.Tensor, dtype) -> nn.Linear:
    with torch.device(weight.device):
        return nn.Linear(in_features, out_features, bias=False, dtype=dtype)


def add_adapters(
    model: nn.Module, linears: list[str], experts: dict[str, list[str]], spec: LoraSpec, dtype: torch.dtype
) -> None:
    """Turn the named Linears into `LoRALinear`s and the named experts into `LoRAExperts`, in place, with
    uninitialised adapters of `dtype` on the device of their base (meta while the model is still meta)."""
    modules = dict(model.named_modules())
    dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
    shared: dict[str, nn.Linear] = {}
    wanted = set(linears)
    for name in [n for n in modules if n in wanted]:  # module order: a vision q_proj before its k/v
        lin = modules[name]
        lin.__class__ = LoRALinear
        lin.lora_scale, lin.lora_dropout = spec.scale, dropout
        parent, _, leaf = name.rpartition(".")
        if leaf in ("k_proj", "v_proj") and kind_of(name)[1] == "qkv":
            lin.__dict__["_shared_lora_A"] = shared[parent]  # q_proj comes first in module order
        else:
            lin.lora_A = _linear_like(lin.in_features, spec.rank, lin.weight, dtype)
            shared[parent] = lin.lora_A
        lin.lora_B = _linear_like(spec.rank, lin.out_features, lin.weight, dtype)
    for name, params in experts.items():
        ex = modules[name]
        ex.__class__ = LoRAExperts
        ex.lora_scale, ex.lora_projections = spec.scale, tuple(params)
        for proj in params:
            e, d_in, d_out = getattr(ex, proj).shape
            dev = getattr(ex, proj).device
            ex.register_parameter(
                f"{proj}_lora_A", nn.Parameter(torch.empty(e, d_in, spec.rank, device=dev, dtype=dtype))
            )
            ex.register_parameter(f"{proj}_lora_B", nn.Parameter(torch.empty(e, spec.rank, d_out, device=dev, dtype=dtype)))  # fmt: skip


def is_adapter(param_name: str) -> bool:
    return ".lora_A." in param_name or ".lora_B." in param_name or param_name.endswith(("_lora_A", "_lora_B"))


def initial_value(name: str, shape, seed: int) -> torch.Tensor:
    """PEFT's default initialisation of an adapter parameter, the same for every parallel layout: A uniform in
    +-1/sqrt(fan_in) (Kaiming-uniform with a=sqrt(5), as nn.Linear), B zero. Drawn whole on the CPU from a
    generator seeded by `seed` and the parameter's name."""
    if "lora_B" in name:
        return torch.zeros(shape)
    fan_in = shape[1]  # Linear A [r, in]; expert A [E, in, r]
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=g)


@torch.no_grad()
def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (`W + scale * B A`) and restore the plain modules."""
    for module in list(model.modules()):
        if isinstance(module, LoRALinear):
            a = module.adapter_a().weight
            module.weight += (module.lora_B.weight.float() @ a.float() * module.lora_scale).to(
                module.weight.dtype
            )
        elif isinstance(module, LoRAExperts):
            for proj in module.lora_projections:
                a, b = getattr(module, f"{proj}_lora_A"), getattr(module, f"{proj}_lora_B")
                w = getattr(module, proj)
                w += (torch.bmm(a.float(), b.float()) * module.lora_scale).to(w.dtype)
    for module in list(model.modules()):
        if isinstance(module, LoRALinear):
            module.__dict__.pop("_shared_lora_A", None)
            for child in ("lora_A", "lora_B", "lora_dropout"):
                if child in module._modules:
                    del module._modules[child]
            module.__class__ = nn.Linear
        elif isinstance(module, LoRAExperts):
            for proj in module.lora_projections:
                del module._parameters[f"{proj}_lora_A"], module._parameters[f"{proj}_lora_B"]
            module.__class__ = Experts
