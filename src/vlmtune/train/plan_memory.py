"""Per-rank parameter, gradient, optimizer and FSDP buffer memory of a layout, from the meta-built model.

The byte counts are those FSDP2 and DTensor allocate: every parameter is placed (pipeline stage,
tensor-parallel shard, expert shard, FSDP unit) and FSDP2's per-parameter padding of dim 0 to a multiple of
the shard count is applied (every rank allocates the padded shard; rank 0 holds the largest real one).
Each parameter is stored in its own dtype: the records come from the model the trainer builds (freezing and,
for a LoRA run, the real adapters of `train/lora.py` with the base frozen in the compute dtype), and QLoRA's
NF4 weights take the bytes torchao allocates (`qlora.nf4_bytes`).
Context-parallel ranks are FSDP shards too (the trainer shards over dp_shard x cp, `parallel/context.py`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from vlmtune.models.qwen3_vl import Qwen3VL, build_model
from vlmtune.models.qwen3_vl.config import ModelArgs
from vlmtune.models.qwen3_vl.lora import LoRALinear
from vlmtune.parallel.tensor import MERGER_PLAN, VISION_BLOCK_PLAN, decoder_plan

from .freeze import apply_freeze
from .qlora import nf4_bytes, quantizable

GiB = 2**30


@dataclass
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    llm_pp_layers: list[int] = field(default_factory=list)
    pp_schedule: str = "1f1b"

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @classmethod
    def from_parallel(cls, p) -> Layout:
        """From a resolved `ParallelConfig` (`cp` read when the config has it)."""
        return cls(
            dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, pp=p.pp, ep=p.ep,
            cp=getattr(p, "cp", 1), llm_pp_layers=list(p.llm_pp_layers), pp_schedule=p.pp_schedule,
        )  # fmt: skip


@dataclass
class Precision:
    master: torch.dtype  # stored (sharded) parameters and optimizer state
    compute: torch.dtype  # FSDP all-gathers, activations
    reduce: torch.dtype  # gradient reduce-scatter

    @classmethod
    def from_config(cls, cfg) -> Precision:
        master = getattr(torch, cfg.model.dtype)
        bf16 = cfg.train.mixed_precision == "bf16"
        return cls(master, torch.bfloat16 if bf16 else master, torch.float32 if bf16 else master)


# ------------------------------------------------------------------------------------------ placement


@dataclass
class ParamRecord:
    name: str
    shape: tuple[int, ...]
    trainable: bool
    unit: str  # FSDP unit: "root", "visual.blocks.3", "language_model.layers.7" (+ ".experts" under EP)
    stage_key: str  # "vision", "embed", "layer:<i>", "head"
    tp_dim: int | None  # dimension sharded by tensor parallelism (None: replicated)
    expert: bool
    itemsize: int = 4  # bytes per element as stored (and of its gradient and AdamW state)
    nf4: bool = False  # QLoRA stores it as NF4 where a layout fits (`qlora.nf4_bytes`)


def _tp_dims(model: Qwen3VL) -> dict[str, int]:
    """{parameter name: sharded dim} from the tensor-parallel plans of `parallel/tensor.py`, and for LoRA
    adapters the placements `parallel/lora_tp.py` gives them (column-parallel base: B on dim 0; row-parallel
    base: A on dim 1)."""
    out = {"language_model.embed_tokens.weight": 0, "lm_head.weight": 0}

    def add(prefix: str, plan: dict, module: nn.Module) -> None:
        for path, style in plan.items():
            sub = module.get_submodule(path)
            for pname, _ in sub.named_parameters(recurse=False):
                full = f"{prefix}.{path}.{pname}"
                if isinstance(style, ColwiseParallel):
                    out[full] = 0
                elif isinstance(style, RowwiseParallel) and pname == "weight":
                    out[full] = 1
            if isinstance(sub, LoRALinear):
                adapter = "lora_B" if isinstance(style, ColwiseParallel) else "lora_A"
                out[f"{prefix}.{path}.{adapter}.weight"] = 0 if adapter == "lora_B" else 1

    for i, layer in model.language_model.layers.items():
        add(f"language_model.layers.{i}", decoder_plan(layer), layer)
    for i, block in model.visual.blocks.items():
        add(f"visual.blocks.{i}", VISION_BLOCK_PLAN, block)
    add("visual.merger", MERGER_PLAN, model.visual.merger)
    for j, merger in enumerate(model.visual.deepstack_merger_list):
        add(f"visual.deepstack_merger_list.{j}", MERGER_PLAN, merger)
    return out


def param_records(model: Qwen3VL, nf4: bool = False) -> list[ParamRecord]:
    """Every parameter of a (meta) model with where it lives and its dtype; tied parameters once. `nf4`: a
    QLoRA run (`lora.base_quant: nf4`), whose frozen decoder projections become NF4."""
    tp_dims = _tp_dims(model)
    out = []
    for name, p in model.named_parameters():
        block = re.match(r"(visual\.blocks\.\d+|language_model\.layers\.(\d+))\.", name)
        expert = ".mlp.experts." in name
        unit = block.group(1) if block else "root"
        if name.startswith(("visual.", "language_model.embed_tokens.")):
            stage = "vision" if name.startswith("visual.") else "embed"
        elif block and block.group(2) is not None:
            stage = f"layer:{block.group(2)}"
        else:
            stage = "head"
        module, _, leaf = name.rpartition(".")
        quantized = nf4 and leaf == "weight" and quantizable(module) and not p.requires_grad
        out.append(ParamRecord(
            name, tuple(p.shape), p.requires_grad, unit, stage, tp_dims.get(name), expert,
            p.dtype.itemsize, quantized,
        ))  # fmt: skip
    return out


def stages_of_rank(layout: Layout, num_layers: int, rank: int = 0) -> tuple[set[int], bool, bool]:
    """(decoder layers, has vision + embeddings, has final norm + lm_head) of pipeline rank `rank`."""
    if layout.pp == 1:
        return set(range(num_layers)), True, True
    sizes = layout.llm_pp_layers
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    mine = range(rank, len(sizes), layout.pp)
    layers = {k for s in mine for k in range(starts[s], starts[s] + sizes[s])}
    return layers, 0 in mine, len(sizes) - 1 in mine


def _on_rank(r: ParamRecord, layers: set[int], first: bool, last: bool) -> bool:
    if r.stage_key.startswith("layer:"):
        return int(r.stage_key[6:]) in layers
    return first if r.stage_key in ("vision", "embed") else last


def _local_numel(r: ParamRecord, layout: Layout, dp_rank: int = 0) -> tuple[int, int, int]:
    """(FSDP shard numel as FSDP2 allocates it: dim 0 padded to ceil(dim0 / shards) rows on every rank, the
    number of FSDP shards, the numel of the real rows of data-parallel rank `dp_rank` (optimizer state))."""
    shape = list(r.shape)
    if r.tp_dim is not None and layout.tp > 1:
        shape[r.tp_dim] = math.ceil(shape[r.tp_dim] / layout.tp)
    shards = layout.dp_shard * layout.cp
    if r.expert and layout.ep > 1:
        shape[0] = math.ceil(shape[0] / layout.ep)
        shards = layout.dp_shard // layout.ep * layout.cp
    rest, rows = math.prod(shape[1:]), math.ceil(shape[0] / shards)
    real = min(rows, max(0, shape[0] - (dp_rank % shards) * rows))
    return rows * rest, shards, real * rest


def _grad_numel(r: ParamRecord, layout: Layout, local: int) -> int:
    """Under tensor parallelism without FSDP the vocabulary-sharded token embedding gets a replicated, full
    `[vocab, hidden]` gradient on every rank (DTensor's embedding backward; see tests/test_plan.py)."""
    if r.name == "language_model.embed_tokens.weight" and layout.tp > 1 and layout.dp_shard * layout.cp == 1:
        return math.prod(r.shape)
    return local


def _unit_name(r: ParamRecord, layout: Layout) -> str:
    return f"{r.unit}.experts" if r.expert and layout.ep > 1 else r.unit


# --------------------------------------------------------------------------------------------- states


@dataclass
class StateMemory:
    """Bytes per rank (rank 0 of its pipeline stage)."""

    params: float = 0.0
    params_frozen: float = 0.0  # part of `params`: frozen weights (no gradient, no optimizer state)
    grads: float = 0.0
    optimizer: float = 0.0  # AdamW exp_avg + exp_avg_sq
    optimizer_host: float = 0.0  # AdamW `step` scalars (on the CPU unless fused / capturable)
    unit_gathered: dict[str, float] = field(default_factory=dict)  # FSDP all-gather size per unit
    unit_trainable: dict[str, float] = field(default_factory=dict)  # unsharded trainable numel per unit
    head_trainable: float = 0.0  # unsharded trainable numel of the final norm and lm_head

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def state_memory(
    records: list[ParamRecord],
    layout: Layout,
    precision: Precision,
    *,
    args: ModelArgs,
    rank: int = 0,
    dp_rank: int = 0,
) -> StateMemory:
    """Parameters, gradients and AdamW state of pipeline rank `rank`, data-parallel rank `dp_rank` (rank 0
    holds the largest shards; AdamW's state covers only a shard's real rows, not FSDP's padding). Each
    parameter, its gradient and its AdamW state are in the parameter's own dtype (a LoRA run's frozen base in
    the compute dtype, its adapters in the master dtype); FSDP gathers in the compute dtype."""
    layers, first, last = stages_of_rank(layout, args.text.num_hidden_layers, rank)
    out = StateMemory()
    compute = precision.compute.itemsize
    for r in records:
        if not _on_rank(r, layers, first, last):
            continue
        local, shards, real = _local_numel(r, layout, dp_rank)
        unit = _unit_name(r, layout)
        # QLoRA quantizes for the whole FSDP mesh (dp x cp ranks) and FSDP2 splits over its shard dimension.
        fsdp, split = layout.dp * layout.cp, layout.dp_shard * layout.cp
        nf4 = nf4_bytes(r.shape, r.itemsize, fsdp, split) if r.nf4 else None
        stored = local * r.itemsize if nf4 is None else nf4
        out.params += stored
        if nf4 is None or fsdp > 1:  # on a one-rank FSDP mesh NF4 weights stay outside FSDP
            gathered = local * shards * compute if nf4 is None else nf4 * split
            out.unit_gathered[unit] = out.unit_gathered.get(unit, 0.0) + gathered
        if r.trainable:
            out.grads += _grad_numel(r, layout, local) * r.itemsize
            out.optimizer += 2 * real * r.itemsize
            out.optimizer_host += 4
            out.unit_trainable[unit] = out.unit_trainable.get(unit, 0.0) + local * shards
            if r.stage_key == "head":
                out.head_trainable += local * shards
        else:
            out.params_frozen += stored
    return out


def build_meta_model(args: ModelArgs, freeze=None, dtype=None, lora=None) -> Qwen3VL:
    """The model on the meta device (no memory) as the trainer builds it: in `dtype` (the master dtype), the
    config's freeze groups applied, and with `lora` (a `train/lora.py` LoraSetup) its real adapters."""
    model = build_model(args, dtype=dtype)
    if freeze is not None:
        apply_freeze(model, freeze)
    if lora is not None:
        lora.apply(model)
    return model


def comm_buffers(state: StateMemory, precision: Precision) -> dict[str, float]:
    """FSDP2 buffers at the backward peak: the root unit stays gathered for the whole step (FSDP2 does not
    reshard the root after forward), two block units are gathered at a time (the current one and the
    prefetched next), and the largest block's unsharded gradients wait in the compute dtype, then in the
    reduce dtype, for their reduce-scatter; the lm_head's gradient waits for the root's reduce-scatter at the
    end of backward. There (`final`) the root is resharded; its gradients meet their reduce-scatter buffer."""
    compute, reduce = precision.compute.itemsize, precision.reduce.itemsize
    blocks = {k: v for k, v in state.unit_gathered.items() if k != "root"}
    largest = max(blocks, key=blocks.get, default=None)
    root = state.unit_gathered.get("root", 0.0)
    root_grads = state.unit_trainable.get("root", 0.0)
    block_grads = state.unit_trainable.get(largest, 0.0) if largest else 0.0
    return {
        "root_gathered": root,
        "blocks_gathered": 2 * (blocks[largest] if largest else 0.0),
        "block_grads": block_grads * (compute + reduce),
        "head_grads": state.head_trainable * compute,
        "final": root_grads * (compute + reduce),
    }
