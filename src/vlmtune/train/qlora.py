"""QLoRA: the frozen decoder Linears of a LoRA run stored as 4-bit NF4 (torchao's `NF4Tensor`), dequantized per
layer in the forward (the dequantized weight lives only inside that Linear's forward and backward).

NF4 needs real values, so unlike `build_sharded_model` (meta build, sharding, then streaming each slice in)
this builder loads the base on the host in the compute dtype, quantizes the decoder's attention and MLP
projections there, moves the model to the device and only then shards it (FSDP2 shards NF4 tensors: they
implement its all-gather extension). The vision tower, norms, embeddings, lm_head, the MoE router and experts
stay in the compute dtype. Tensor and pipeline parallelism are refused by the config check.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch
from torch import nn

from vlmtune.checkpoint.hf import load_weights
from vlmtune.models.qwen3_vl import Qwen3VL, build_model, load_config, materialize
from vlmtune.models.qwen3_vl.lora import is_adapter
from vlmtune.parallel.fsdp import parallelize

log = logging.getLogger(__name__)
NF4_BLOCK = 64  # weights per absmax block, as QLoRA
_QUANTIZED = re.compile(r"language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")


def _scaler_block(shape, shards: int) -> int | None:
    """torchao quantizes the block scales in groups of 256 (a small matrix needs a smaller group), and FSDP2
    splits every inner tensor of an NF4 weight in `shards` equal parts; None: this matrix cannot be NF4."""
    numel = shape[0] * shape[1]
    if numel % NF4_BLOCK or shape[0] % shards:
        return None
    blocks = numel // NF4_BLOCK
    fits = [s for s in (256, 128, 64, 32, 16, 8, 4, 2, 1) if blocks % s == 0 and (blocks // s) % shards == 0]
    return fits[0] if fits and blocks % shards == 0 else None


def quantizable(module_name: str) -> bool:
    """Whether QLoRA stores this Linear of `Qwen3VL` (by module name) as NF4: the decoder's projections."""
    return _QUANTIZED.fullmatch(module_name) is not None


def nf4_bytes(shape, itemsize: int, shards: int = 1, split: int | None = None) -> int | None:
    """Bytes one rank allocates for an NF4 weight of 2-D `shape` quantized from `itemsize`-byte values by
    `quantize_decoder(model, shards)` and split by FSDP2 in `split` parts (default `shards`; 1: kept whole);
    None: no NF4 layout fits, the weight stays in the compute dtype.

    Read off torchao 0.18's `NF4Tensor` (tests/test_plan.py checks it against real allocations), for N
    weights in blocks of 64 with block scales in groups of S (`_scaler_block`): the 4-bit codes N/2 bytes,
    the int8 block scales N/64, the S-group factors N/64/S values of the weight's dtype (a whole matrix that is
    one group keeps the [S]-value tensor its one factor was sliced from), the scales' mean one value and the
    16-value NF4 table; FSDP2 splits the codes, scales and factors, every rank keeps a mean and a table.
    Per weight of a large matrix this is 1/2 + 1/64 + itemsize/(64 S) bytes: 0.5157 from bf16, S = 256."""
    scaler = _scaler_block(shape, shards)
    if scaler is None:
        return None
    split = shards if split is None else split
    numel = shape[0] * shape[1]
    factors = numel // NF4_BLOCK // scaler
    if split == 1 and factors == 1:
        factors = scaler
    return (numel // 2 + numel // NF4_BLOCK) // split + (factors // split + 17) * itemsize


@torch.no_grad()
def quantize_decoder(model: nn.Module, shards: int = 1) -> list[str]:
    """Replace the decoder's attention and MLP projection weights by NF4 tensors (that FSDP2 can split in
    `shards`); returns their names."""
    from torchao.quantization import to_nf4  # torchao is needed (and imported) only for QLoRA

    quantized = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and quantizable(name):
            scaler = _scaler_block(module.weight.shape, shards)
            if scaler is None:
                log.warning(
                    "%s %s stays in %s: no NF4 layout fits it",
                    name,
                    tuple(module.weight.shape),
                    module.weight.dtype,
                )
                continue
            nf4 = to_nf4(module.weight.detach(), NF4_BLOCK, scaler)
            module.weight = nn.Parameter(nf4, requires_grad=False)
            quantized.append(f"{name}.weight")
    return quantized


def build_quantized_model(
    path: str,
    root_factory: Callable[[Qwen3VL], nn.Module],
    info,
    *,
    lora,
    dtype: torch.dtype = torch.float32,
    mixed_precision: str = "fp32",
    activation_checkpointing: str = "none",
    compile: bool = False,
    prepare: Callable[[Qwen3VL], object] | None = None,
):
    """Same contract as `build.build_sharded_model`, for `lora.base_quant: nf4`. Returns (root, model)."""
    model = build_model(load_config(path), dtype=dtype)
    if prepare is not None:
        prepare(model)
    lora.apply(model)
    materialize(model, "cpu")
    load_weights(model, path, names={n for n, _ in model.named_parameters() if not is_adapter(n)})
    quantized = quantize_decoder(model, info.fsdp_mesh.size())
    model.to(info.device)
    nf4 = {model.get_parameter(n) for n in quantized}
    model.source_dir = path
    root = root_factory(model)
    # FSDP2's one-rank shortcut takes a single all-gather input per parameter; NF4 has three: on one
    # data-parallel rank the NF4 weights stay outside FSDP (nothing to shard there anyway).
    parallelize(
        root, model, info, dtype=dtype, mixed_precision=mixed_precision,
        activation_checkpointing=activation_checkpointing, compile=compile, ignored_params=nf4 if info.fsdp_mesh.size() == 1 else None,
    )  # fmt: skip
    lora.after_load(model)
    return root, model
