"""Model FLOPs of a training micro-batch from `ModelArgs` alone (no module, no weights), and GPU peaks.

What is counted (matmuls only; biases, norms, activations and the softmax are left out, as is usual):
- every weight matrix: 2 FLOPs per parameter per token forward, +2 for the activation gradient when its
  input needs a gradient, +2 for the weight gradient when the weight trains. Fully trainable this is the
  familiar 6N. Frozen weights are counted as they run: a frozen decoder still back-propagates (4N: the
  trainer always needs gradients at the embeddings); in the vision tower and the mergers gradients flow
  from the first module that trains or holds an adapter on (`vision_flow`), so a frozen tower runs forward
  only (2N) and the patch embedding (its input is pixels) counts 4N when it trains.
- MoE: the router and every non-expert weight count for every token; of the expert weights only the
  top_k / num_experts share a token visits.
- lm_head: on the label tokens only (the chunked loss applies it nowhere else); the embedding is a lookup.
- attention: QK^T and AV, 4 * heads * head_dim per (query, key) pair forward, x3 where the backward runs
  through it; the decoder is causal within each packed sample (n(n+1)/2 pairs), the vision tower attends
  fully within each image and each video frame-pair (s^2 pairs).
- LoRA (a `LoraSpec` `placed` on the model, models/qwen3_vl/lora.py): every base weight is frozen (4N in
  the decoder and lm_head, in the vision tower as the gradients flow). An adapter's B counts 6 per parameter
  per row it runs on, its A 6, or 4 where the Linear's input needs no gradient; rows are decoder tokens
  (decoder and router adapters), top_k / num_experts of them (expert adapters), patches (vision blocks),
  merged tokens (mergers). The vision k/v adapters run q's shared A again. A module trained whole
  (`modules_to_save`) adds 2 per parameter and token for its weight gradient.
Activation-checkpointing recomputation is not model FLOPs (MFU leaves it out; `recompute_flops` gives it
for time predictions). tests/test_flops_counted.py checks the count against torch's FlopCounterMode.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vlmtune.models.qwen3_vl.config import ModelArgs, TextArgs, VisionArgs
from vlmtune.models.qwen3_vl.lora import LoraSpec

from .freeze import group_of

# ------------------------------------------------------------------------------------- parameter counts


def attention_params(t: TextArgs) -> int:
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    bias = (q + 2 * kv + t.hidden_size) if t.attention_bias else 0
    return t.hidden_size * (q + 2 * kv) + q * t.hidden_size + bias


def dense_mlp_params(t: TextArgs) -> int:
    return 3 * t.hidden_size * t.intermediate_size


def expert_params(t: TextArgs) -> int:
    """All experts of one sparse layer (gate_up [E, H, 2I] + down [E, I, H])."""
    return 3 * t.num_experts * t.hidden_size * t.moe_intermediate_size


def vision_block_params(v: VisionArgs) -> int:
    """Matmul weights of one vision block (q, k, v, proj, fc1, fc2; their biases are additions)."""
    c, i = v.hidden_size, v.intermediate_size
    return 4 * c * c + 2 * c * i


def merger_params(v: VisionArgs) -> int:
    """One patch merger's matmul weights (fc1 [4C, 4C], fc2 [4C, D])."""
    m = v.hidden_size * v.spatial_merge_size**2
    return m * m + m * v.out_hidden_size


def active_decoder_params(t: TextArgs) -> dict[str, float]:
    """Per token, summed over layers: attention, dense MLPs, routers, and the experts a token visits."""
    sparse = [i for i in range(t.num_hidden_layers) if t.is_sparse_layer(i)]
    dense = t.num_hidden_layers - len(sparse)
    share = t.num_experts_per_tok / t.num_experts if t.num_experts else 0.0
    return {
        "attention": float(t.num_hidden_layers * attention_params(t)),
        "mlp": float(dense * dense_mlp_params(t)),
        "router": float(len(sparse) * t.hidden_size * t.num_experts),
        "experts": len(sparse) * expert_params(t) * share,
    }


# ------------------------------------------------------------------------------------------- the count


@dataclass
class Trainable:
    """Which freeze groups train (the inverse of the config's `freeze:` section)."""

    vision_encoder: bool = True
    vision_projector: bool = True
    text_decoder: bool = True

    @classmethod
    def from_freeze(cls, freeze) -> Trainable:
        return cls(not freeze.vision_encoder, not freeze.vision_projector, not freeze.text_decoder)


@dataclass
class Flops:
    """Model FLOPs of one micro-batch (forward + backward), by part."""

    decoder: float = 0.0  # decoder weights (attention projections, MLPs, routers, active experts)
    decoder_attention: float = 0.0  # QK^T and AV in the decoder
    lm_head: float = 0.0
    vision: float = 0.0  # patch embedding and vision block weights
    vision_attention: float = 0.0
    projector: float = 0.0  # the merger and the DeepStack mergers
    lora: float = 0.0
    tokens: int = 0

    @property
    def total(self) -> float:
        return (
            self.decoder
            + self.decoder_attention
            + self.lm_head
            + self.vision
            + self.vision_attention
            + self.projector
            + self.lora
        )

    @property
    def per_token(self) -> float:
        return self.total / max(self.tokens, 1)


def _multiplier(trains: bool, backprop: bool) -> int:
    """FLOPs per parameter per token: forward 2, activation gradient 2, weight gradient 2."""
    return 2 + (2 if backprop else 0) + (2 if trains else 0)


def segment_lengths(grids: Sequence[Sequence[int]]) -> list[int]:
    """Vision attention segments (patches) of `(t, h, w)` grids: each image, and each video frame-pair."""
    return [h * w for t, h, w in grids for _ in range(t)]


# --------------------------------------------------------------------------------- where gradients flow


def trains_of(trainable: Trainable, lora: LoraSpec | None) -> Callable[[str], bool]:
    """Whether a module's own weights train, by module name: its freeze group, or under LoRA (which freezes
    every base weight) whether it is trained whole (`modules_to_save`)."""
    if lora is not None:
        return lora.trains
    return lambda module: getattr(trainable, group_of(module + "."))


def changes_of(trainable: Trainable, lora: LoraSpec | None) -> Callable[[str], bool]:
    """Whether a module adds a gradient path, by module name: its weights train or it holds an adapter."""
    trains = trains_of(trainable, lora)
    if lora is None:
        return trains
    return lambda module: module in lora.linears or module in lora.experts or trains(module)


@dataclass(frozen=True)
class BlockFlow:
    """Which tensors of a vision block need a gradient; autograd computes, and keeps inputs for, only those."""

    input: bool  # the block's input: LayerNorm 1's
    normed: bool  # LayerNorm 1's output, which q, k and v read
    rotary: bool  # q or k: the rotary embedding back-propagates
    attention: bool  # q, k or v: the core attention back-propagates; proj's input
    mid: bool  # the residual after attention: LayerNorm 2's input
    normed2: bool  # LayerNorm 2's output: fc1's input
    hidden: bool  # fc1's output: GELU's and fc2's input
    output: bool


@dataclass(frozen=True)
class MergerFlow:
    input: bool  # LayerNorm's input
    normed: bool  # fc1's input
    hidden: bool  # fc1's output: GELU's and fc2's input
    output: bool


@dataclass(frozen=True)
class VisionFlow:
    """Where gradients flow in the vision tower: they start at the first module that `changes` (trains or
    holds an adapter); before it, nothing back-propagates."""

    embed: bool  # the patch embedding plus position table: the first block's input
    blocks: list[BlockFlow]
    mergers: dict[str, MergerFlow]  # by module name: the DeepStack mergers, then the merger


def block_flow(name: str, changes: Callable[[str], bool], grad: bool) -> BlockFlow:
    """Vision block `name`, its input needing a gradient (`grad`) or not."""

    def c(sub: str) -> bool:
        return changes(f"{name}.{sub}")

    normed = grad or c("norm1")
    rotary = normed or c("attn.q_proj") or c("attn.k_proj")
    attention = rotary or c("attn.v_proj")
    mid = grad or attention or c("attn.proj")
    normed2 = mid or c("norm2")
    hidden = normed2 or c("mlp.linear_fc1")
    return BlockFlow(grad, normed, rotary, attention, mid, normed2, hidden, hidden or c("mlp.linear_fc2"))


def merger_flow(name: str, changes: Callable[[str], bool], grad: bool) -> MergerFlow:
    normed = grad or changes(f"{name}.norm")
    hidden = normed or changes(f"{name}.linear_fc1")
    return MergerFlow(grad, normed, hidden, hidden or changes(f"{name}.linear_fc2"))


def vision_flow(v: VisionArgs, changes: Callable[[str], bool]) -> VisionFlow:
    grad = embed = changes("visual.patch_embed") or changes("visual.pos_embed")
    blocks = []
    for i in range(v.depth):
        blocks.append(block_flow(f"visual.blocks.{i}", changes, grad))
        grad = blocks[-1].output
    # A DeepStack merger reads block i's output; the merger the last block's.
    sources = [(f"visual.deepstack_merger_list.{j}", i) for j, i in enumerate(v.deepstack_visual_indexes)]
    mergers = {name: merger_flow(name, changes, blocks[i].output) for name, i in sources}
    mergers["visual.merger"] = merger_flow("visual.merger", changes, grad)
    return VisionFlow(embed, blocks, mergers)


def model_flops(
    args: ModelArgs,
    sample_lengths: Sequence[int],
    grids: Sequence[Sequence[int]] = (),
    *,
    label_tokens: int | None = None,
    trainable: Trainable | None = None,
    lora: LoraSpec | None = None,
) -> Flops:
    """FLOPs of one packed micro-batch: `sample_lengths` its samples' token counts, `grids` the `(t, h, w)`
    patch grids of its images and videos, `label_tokens` the positions the loss reads (default: all).
    With `lora` (placed) the freeze groups of `trainable` do not matter: LoRA freezes every base weight."""
    t = args.text
    tr = trainable or Trainable()
    tokens = int(sum(sample_lengths))
    labels = tokens if label_tokens is None else label_tokens
    out = Flops(tokens=tokens)
    base_trains = tr.text_decoder and lora is None
    dec = sum(active_decoder_params(t).values())
    out.decoder = _multiplier(base_trains, True) * dec * tokens
    pairs = sum(n * (n + 1) // 2 for n in sample_lengths)
    out.decoder_attention = 12 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * pairs
    out.lm_head = _multiplier(base_trains, True) * t.hidden_size * t.vocab_size * labels
    if lora is not None:
        _add_decoder_lora(out, t, lora, tokens, labels)
    if grids:
        _add_vision(out, args.vision, grids, changes_of(tr, lora), trains_of(tr, lora), lora)
    return out


def _add_decoder_lora(out: Flops, t: TextArgs, lora: LoraSpec, tokens: int, labels: int) -> None:
    """Decoder and lm_head adapters, 6 per parameter and token they touch (every input back-propagates), and
    the weight gradients of the modules trained whole there, 2 per parameter and token."""
    share = t.num_experts_per_tok / t.num_experts if t.num_experts else 0.0
    rows = {"decoder": tokens, "experts": tokens * share, "lm_head": labels}
    out.lora += sum(6 * lora.adapter_params.get(k, 0) * n for k, n in rows.items())
    saved = {k: 2 * lora.saved_params.get(k, 0) * n for k, n in rows.items()}
    out.decoder += saved["decoder"] + saved["experts"]
    out.lm_head += saved["lm_head"]


def _linear(rows: int, d_in: int, d_out: int, in_grad: bool, trains: bool, rank: int) -> tuple[int, int]:
    """(weight, adapter) FLOPs of a Linear on `rows` rows; `rank` 0: no adapter. An adapter's A [r, in] counts
    forward and weight gradient, and its input gradient where the input needs one; its B [out, r] all three
    (A trains, so B's input needs a gradient). A vision k/v adapter runs q's shared A once more."""
    base = (2 + 2 * in_grad + 2 * trains) * d_in * d_out * rows
    return base, rows * rank * (d_in * (4 + 2 * in_grad) + 6 * d_out)


def _add_vision(out: Flops, v: VisionArgs, grids, changes, trains, lora: LoraSpec | None) -> None:
    """The patch embedding, the blocks and the mergers Linear by Linear, each with the gradients that flow
    through it (`vision_flow`); the attention x3 in blocks it back-propagates through."""
    patches = sum(a * b * c for a, b, c in grids)
    merged = patches // v.spatial_merge_size**2
    c, i = v.hidden_size, v.intermediate_size
    m = c * v.spatial_merge_size**2
    flow = vision_flow(v, changes)

    def add(part: str, name: str, rows: int, d_in: int, d_out: int, in_grad: bool) -> None:
        rank = lora.rank if lora is not None and name in lora.linears else 0
        base, adapter = _linear(rows, d_in, d_out, in_grad, trains(name), rank)
        setattr(out, part, getattr(out, part) + base)
        out.lora += adapter

    add("vision", "visual.patch_embed", patches, v.patch_dim, c, False)
    attention = 4 * c * sum(s * s for s in segment_lengths(grids))
    for k, b in enumerate(flow.blocks):
        name = f"visual.blocks.{k}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            add("vision", f"{name}.attn.{proj}", patches, c, c, b.normed)
        add("vision", f"{name}.attn.proj", patches, c, c, b.attention)
        add("vision", f"{name}.mlp.linear_fc1", patches, c, i, b.normed2)
        add("vision", f"{name}.mlp.linear_fc2", patches, i, c, b.hidden)
        out.vision_attention += (3 if b.attention else 1) * attention
    for name, f in flow.mergers.items():
        add("projector", f"{name}.linear_fc1", merged, m, m, f.normed)
        add("projector", f"{name}.linear_fc2", merged, m, v.out_hidden_size, f.hidden)


def flops_per_token(args: ModelArgs, sample_lengths: Sequence[int], **kwargs) -> float:
    return model_flops(args, sample_lengths, **kwargs).per_token


def recompute_flops(
    args: ModelArgs,
    sample_lengths: Sequence[int],
    grids: Sequence[Sequence[int]] = (),
    *,
    decoder_layers: int,
    vision_blocks: int,
) -> float:
    """Forward FLOPs recomputed in backward when `decoder_layers` decoder layers and `vision_blocks` vision
    blocks are checkpointed (time predictions; not model FLOPs)."""
    t, v = args.text, args.vision
    tokens = sum(sample_lengths)
    per_layer = sum(active_decoder_params(t).values()) / t.num_hidden_layers
    pairs = sum(n * (n + 1) // 2 for n in sample_lengths)
    out = decoder_layers * (2 * per_layer * tokens + 4 * t.num_attention_heads * t.head_dim * pairs)
    patches = sum(a * b * c for a, b, c in grids)
    attn_pairs = sum(s * s for s in segment_lengths(grids))
    out += vision_blocks * (2 * vision_block_params(v) * patches + 4 * v.hidden_size * attn_pairs)
    return out


# ------------------------------------------------------------------------------------------ GPU peaks

# Dense (no sparsity) bf16 tensor-core TFLOP/s from the vendors' datasheets.
PEAK_TFLOPS = {
    "B200": 2250.0,
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H800": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "RTX 4090": 165.0,
}


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^A-Z0-9]+", name.upper()) if w]


def table_key(device_name: str) -> str | None:
    """Which `PEAK_TFLOPS` entry a `torch.cuda.get_device_name()` string names, or None.

    Matches whole words, so 'H20' is not 'H200' and 'GH200' (an H100-class GPU in a Grace Hopper superchip)
    is not 'H200'. Examples: 'NVIDIA H100 80GB HBM3' -> H100 SXM, 'NVIDIA H100 PCIe' -> H100 PCIe,
    'NVIDIA A100-SXM4-40GB' -> A100, 'NVIDIA GeForce RTX 4090' -> RTX 4090."""
    words = _words(device_name)
    if "GH200" in words:
        return "H100 SXM"
    if "H100" in words:
        return "H100 PCIe" if "PCIE" in words else "H100 NVL" if "NVL" in words else "H100 SXM"
    for key in ("B200", "H200", "H800", "H20", "A100", "A800", "L40S"):
        if key in words:
            return key
    if "4090" in words:
        return "RTX 4090"
    return None


def peak_tflops_for(device_name: str, configured: float = 0.0) -> float | None:
    """Peak dense bf16 TFLOP/s: `configured` (logging.peak_tflops) when > 0, else the table, else None."""
    if configured > 0:
        return configured
    key = table_key(device_name)
    return PEAK_TFLOPS[key] if key else None
