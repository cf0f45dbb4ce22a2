"""Model FLOPs of a training micro-batch from `ModelArgs` alone (no module, no weights), and GPU peaks.

What is counted (matmuls only; norms, activations and the softmax are left out, as is usual):
- every weight matrix: 2 FLOPs per parameter per token forward, +2 for the activation gradient when the
  backward has to pass through it, +2 for the weight gradient when the weight trains. Fully trainable
  this is the familiar 6N. Frozen weights are counted as they run: a frozen decoder still back-propagates
  (4N: the trainer always needs gradients at the embeddings), a frozen vision encoder runs forward only (2N).
  The patch embedding never needs an input gradient (pixels), so it counts 4N when it trains.
- MoE: the router and every non-expert weight count for every token; of the expert weights only the
  top_k / num_experts share a token visits.
- lm_head: on the label tokens only (the chunked loss applies it nowhere else); the embedding is a lookup.
- attention: QK^T and AV, 4 * heads * head_dim per (query, key) pair forward, x3 with the backward; the
  decoder is causal within each packed sample (n(n+1)/2 pairs), the vision tower attends fully within each
  image and each video frame-pair (s^2 pairs).
Activation-checkpointing recomputation is not model FLOPs (MFU leaves it out; `recompute_flops` gives it
for time predictions). LoRA, when configured, adds 6 FLOPs per adapter parameter per token and turns the
targeted base weights into frozen ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from vlmtune.models.qwen3_vl.config import ModelArgs, TextArgs, VisionArgs

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
    """Matmul weights and biases of one vision block (q, k, v, proj, fc1, fc2)."""
    c, i = v.hidden_size, v.intermediate_size
    return 4 * (c * c + c) + 2 * c * i + i + c


def merger_params(v: VisionArgs) -> int:
    """One patch merger's matmul weights and biases (fc1 [4C, 4C], fc2 [4C, D])."""
    m = v.hidden_size * v.spatial_merge_size**2
    return m * m + m + m * v.out_hidden_size + v.out_hidden_size


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
class LoraSpec:
    """LoRA adapters of rank `rank` on the decoder Linears named in `targets` (q_proj ... down_proj)."""

    rank: int
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def lora_params(t: TextArgs, lora: LoraSpec) -> int:
    """Adapter parameters over all decoder layers: rank * (in + out) per targeted Linear (the dense MLP's
    Linears exist in dense layers only; experts are not Linears and get no adapter)."""
    h, i = t.hidden_size, t.intermediate_size
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    attn = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    mlp = {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def per_layer(shapes: dict) -> int:
        return sum(lora.rank * (a + b) for name, (a, b) in shapes.items() if name in lora.targets)

    dense = sum(not t.is_sparse_layer(k) for k in range(t.num_hidden_layers))
    return t.num_hidden_layers * per_layer(attn) + dense * per_layer(mlp)


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
    patch grids of its images and videos, `label_tokens` the positions the loss reads (default: all)."""
    t, v = args.text, args.vision
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
        out.lora = 6 * lora_params(t, lora) * tokens
    patches = sum(a * b * c for a, b, c in grids)
    if patches:
        enc, proj = tr.vision_encoder, tr.vision_projector
        block = vision_block_params(v) * v.depth
        patch_embed = (v.patch_dim + 1) * v.hidden_size
        out.vision = (_multiplier(enc, enc) * block + _multiplier(enc, False) * patch_embed) * patches
        attn_pairs = sum(s * s for s in segment_lengths(grids))
        out.vision_attention = (3 if enc else 1) * 4 * v.depth * v.hidden_size * attn_pairs
        mergers = merger_params(v) * (1 + len(v.deepstack_visual_indexes))
        out.projector = _multiplier(proj, enc) * mergers * patches // v.spatial_merge_size**2
    return out


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
