"""Activation memory of one training micro-batch, predicted op by op from what the code saves for backward.

The model mirrors the forward of `Qwen3VL` + `TrainModule` (chunked loss included): every tensor an op keeps
for its backward is entered once under a name, so a tensor several ops save (a norm's output read by q, k
and v) counts once, as it occupies memory once. What an op keeps depends on what needs a gradient: a frozen
Linear keeps nothing of its input, a frozen vision encoder keeps nothing at all, and the decoder always
back-propagates (the trainer makes the embeddings require grad). Two attention kernels, as the code picks:
- "sdpa" (the CPU, or fp32 anywhere): `scaled_dot_product_attention` with the boolean mask, which SDPA
  converts to the compute dtype on every call and keeps (`[L, L]` per decoder layer, `[N, N]` per vision
  block); on the CPU LayerNorm keeps its statistics in the compute dtype.
- "flash" (CUDA, bf16/fp16): FlashAttention varlen keeps q, k, v, the output and the fp32 log-sum-exp, no
  mask; LayerNorm statistics in fp32.
Activation checkpointing keeps, for a checkpointed block, its positional tensor inputs only (the hidden
states, cos/sin, and in the vision tower the segment offsets and the boolean mask). `attention_recompute`
(Megatron's selective recompute) keeps the core attention's inputs but not its statistics or converted mask.
Tested against a `saved_tensors_hooks` count on the CPU (tests/test_plan.py). Besides what is saved, the
model lists what stays alive until backward without being saved (`alive`: the decoder's boolean mask held by
checkpointed layers) and a backward working-set estimate (`transient`), which the tests do not measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vlmtune.models.qwen3_vl.config import ModelArgs

from .flops import LoraSpec, Trainable, segment_lengths

INT64, INT32, FP32, BOOL = 8, 4, 4, 1


@dataclass
class MicroBatch:
    """Shape of one packed micro-batch: token count of each sample, `(t, h, w)` patch grids, label tokens."""

    sample_lengths: list[int]
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    label_tokens: int | None = None  # None: every token carries a label (an upper bound)

    @property
    def tokens(self) -> int:
        return int(sum(self.sample_lengths))

    @property
    def patches(self) -> int:
        return int(sum(t * h * w for t, h, w in self.grids))

    @property
    def labels(self) -> int:
        return self.tokens if self.label_tokens is None else self.label_tokens


@dataclass
class ActivationSpec:
    args: ModelArgs
    batch: MicroBatch
    compute_bytes: int = 2  # 4 fp32, 2 bf16
    kernel: str = "flash"  # "flash": FlashAttention varlen (CUDA, bf16/fp16); "sdpa": SDPA + boolean mask
    trainable: Trainable = field(default_factory=Trainable)
    lora: LoraSpec | None = None
    checkpointed: frozenset[int] = frozenset()  # checkpointed blocks: vision blocks, then decoder layers
    attention_recompute: bool = False  # Megatron-selective: only the core attention is recomputed
    tp: int = 1
    cp: int = 1
    ep: int = 1
    decoder_layers: Sequence[int] | None = None  # this pipeline stage's layers (None: all)
    has_vision: bool = True  # this stage runs the vision tower and the embeddings
    has_head: bool = True  # this stage runs the final norm and the loss
    loss_chunk: int = 1024  # loss.chunk_size: label rows whose logits exist at once
    pipeline: bool = False  # a pipeline stage: it builds the decoder's [L, L] boolean mask on every device


class Ledger:
    """Named tensors kept for backward, each entered once: {name: (part, bytes, kind)}."""

    def __init__(self):
        self.items: dict[str, tuple[str, float, str]] = {}

    def add(self, name: str, part: str, nbytes: float, kind: str = "saved") -> None:
        self.items.setdefault(name, (part, float(nbytes), kind))

    def total(self, part: str | None = None, kind: str = "saved") -> float:
        return sum(b for p, b, k in self.items.values() if k == kind and (part is None or p == part))


def checkpointed_blocks(mode: str, n_vision: int, n_decoder: int):
    """(block indexes recomputed whole, attention-only recompute) for an activation_checkpointing mode.

    Block order is the trainer's: vision blocks then decoder layers. `selective` is Megatron's core-attention
    recompute (parallel/fsdp.py)."""
    every = range(n_vision + n_decoder)
    if mode == "full":
        return frozenset(every), False
    if mode == "every_other":
        return frozenset(i for i in every if i % 2 == 0), False
    if mode == "selective":
        return frozenset(), True
    return frozenset(), False


# ---------------------------------------------------------------------------------------------- decoder


def _rms_norm(led: Ledger, s: ActivationSpec, name: str, part: str, rows: float, width: float, trains: bool):
    """RMSNorm keeps its input in fp32 (the input itself when fp32), 1/rms, and the normalised tensor when its
    weight trains. The input is entered as `name.in` when fp32, so a caller that saved it too shares it."""
    c = s.compute_bytes
    led.add(f"{name}.in" if c == FP32 else f"{name}.in32", part, rows * width * FP32)
    led.add(f"{name}.rsqrt", part, rows * FP32)
    if trains:
        led.add(f"{name}.normed", part, rows * width * c)


def _core_attention(
    led: Ledger, s: ActivationSpec, name: str, part: str, n: float, shape: tuple, mask: float
):
    """SDPA / FlashAttention: q, k, v, output, log-sum-exp (and on the CPU the `mask`-element mask converted
    to the compute dtype). `shape`: (query heads, key/value heads, head dim) on this rank."""
    c, (heads, kv, dim) = s.compute_bytes, shape
    led.add(f"{name}.q", part, n * heads * dim * c)
    led.add(f"{name}.k", part, n * kv * dim * c)
    led.add(f"{name}.v", part, n * kv * dim * c)
    if s.attention_recompute:
        return
    led.add(f"{name}.out", part, n * heads * dim * c)
    led.add(f"{name}.lse", part, n * heads * FP32)
    if s.kernel == "sdpa":
        led.add(f"{name}.mask", part, mask * c)


def _moe(led: Ledger, s: ActivationSpec, name: str, n: float, trains: bool):
    """Router (fp32 softmax, top-k) and the sorted-by-expert SwiGLU of `expert_mlp` (or its EP variant)."""
    t, c = s.args.text, s.compute_bytes
    h, i, e, k = t.hidden_size, t.moe_intermediate_size, t.num_experts, t.num_experts_per_tok
    rows = n * k
    if trains:
        led.add(f"{name}.post.out", "decoder", n * h * c)
    led.add(f"{name}.probs", "decoder", n * e * FP32)
    led.add(f"{name}.topk", "decoder", n * k * (INT64 + FP32) + n * FP32)
    led.add(f"{name}.index", "decoder", 2 * rows * INT64 + e * INT32)
    # gate|up out, silu out, expert out, its router weights, the weighted out; with trainable experts also
    # the rows going in and silu*up (the grouped GEMMs' inputs)
    per_row = 2 * h + 3 * i + 1 + (h + i if trains else 0)
    led.add(f"{name}.expert_rows", "decoder", rows * per_row * c)
    if s.ep > 1:  # the rows received from other ranks, sorted by local expert, before the grouped GEMM
        led.add(f"{name}.ep_rows", "decoder", rows * (h * c + INT64))


def _decoder_layer(led: Ledger, s: ActivationSpec, layer: int, n: float, mask: float):
    t, c, tp = s.args.text, s.compute_bytes, s.tp
    name, trains = f"dec{layer}", s.trainable.text_decoder and s.lora is None
    h, hd = t.hidden_size, t.head_dim
    heads, kv = t.num_attention_heads // tp, t.num_key_value_heads // tp
    _rms_norm(led, s, f"{name}.in", "decoder", n, h, trains)
    if trains:
        led.add(f"{name}.in.out", "decoder", n * h * c)  # read by q, k and v
    _rms_norm(led, s, f"{name}.qn", "decoder", n * heads, hd, trains)
    _rms_norm(led, s, f"{name}.kn", "decoder", n * kv, hd, trains)
    _core_attention(led, s, f"{name}.attn", "decoder", n, (heads, kv, hd), mask)
    if s.attention_recompute and trains:
        led.add(f"{name}.attn.out", "decoder", n * heads * hd * c)  # o_proj's input
    _rms_norm(led, s, f"{name}.post", "decoder", n, h, trains)
    if t.is_sparse_layer(layer):
        _moe(led, s, name, n, trains)
    else:
        if trains:
            led.add(f"{name}.post.out", "decoder", n * h * c)  # read by gate and up
        inter = t.intermediate_size // tp
        led.add(f"{name}.mlp", "decoder", n * inter * c * (4 if trains else 3))
    if s.lora is not None:
        _lora(led, s, name, n, sparse=t.is_sparse_layer(layer))


def _lora(led: Ledger, s: ActivationSpec, name: str, n: float, sparse: bool):
    """A LoRA adapter keeps its input (for A's gradient) and the rank-r projection (for B's); a sparse
    layer has no dense MLP to adapt."""
    t, c = s.args.text, s.compute_bytes
    targets = set(s.lora.targets) - ({"gate_proj", "up_proj", "down_proj"} if sparse else set())
    if targets & {"q_proj", "k_proj", "v_proj"}:
        led.add(f"{name}.in.out", "decoder", n * t.hidden_size * c)
    if targets & {"gate_proj", "up_proj"}:
        led.add(f"{name}.post.out", "decoder", n * t.hidden_size * c)
    if "o_proj" in targets:
        led.add(f"{name}.attn.out", "decoder", n * t.num_attention_heads // s.tp * t.head_dim * c)
    led.add(f"{name}.lora", "decoder", len(targets) * n * s.lora.rank * c)


def _decoder(led: Ledger, s: ActivationSpec, layers: Sequence[int], offset: int):
    t, c, b = s.args.text, s.compute_bytes, s.batch
    n = b.tokens / s.cp
    mask = b.tokens * b.tokens  # the [L, L] mask covers the whole packed row
    led.add("dec.cos_sin", "decoder", 2 * n * t.head_dim * c)
    for layer in layers:
        if offset + layer in s.checkpointed:
            led.add(f"dec{layer}.input", "decoder", n * t.hidden_size * c)
            if s.kernel == "sdpa" or s.pipeline:  # held by the checkpointed layers' arguments
                led.add("dec.bool_mask", "decoder", mask * BOOL, kind="alive")
        else:
            _decoder_layer(led, s, layer, n, mask)


# ----------------------------------------------------------------------------------------------- vision


def _vision_block(led: Ledger, s: ActivationSpec, i: int, n: float, stat: int):
    v, c = s.args.vision, s.compute_bytes
    cw, inter, heads = v.hidden_size, v.intermediate_size // s.tp, v.num_heads // s.tp
    name = f"vis{i}"
    led.add(f"{name}.in", "vision", n * cw * c)  # LayerNorm 1 input: the previous block's output
    led.add(f"{name}.ln1", "vision", n * cw * c + 2 * n * stat)  # its output (q, k, v read it), mean, rstd
    _core_attention(led, s, f"{name}.attn", "vision", n, (heads, heads, v.head_dim), n * n)
    if s.attention_recompute:
        led.add(f"{name}.attn.out", "vision", n * heads * v.head_dim * c)
    led.add(f"{name}.ln2", "vision", 2 * n * cw * c + 2 * n * stat)  # LayerNorm 2 input, output, statistics
    led.add(f"{name}.mlp", "vision", 2 * n * inter * c)


def _merger(led: Ledger, s: ActivationSpec, name: str, source: str, n: float, stat: int, postshuffle: bool):
    """A patch merger: LayerNorm (over patches, or over merged tokens after the shuffle), fc1, GELU, fc2."""
    v, c = s.args.vision, s.compute_bytes
    tr = s.trainable
    if not (tr.vision_projector or tr.vision_encoder):
        return
    merged = n / v.spatial_merge_size**2
    width = v.hidden_size * v.spatial_merge_size**2
    led.add(source, "vision", n * v.hidden_size * c)
    led.add(f"{name}.stats", "vision", 2 * (merged if postshuffle else n) * stat)
    led.add(f"{name}.gelu_in", "vision", merged * width / s.tp * c)
    if tr.vision_projector:
        led.add(f"{name}.fc1_in", "vision", merged * width * c)
        led.add(f"{name}.fc2_in", "vision", merged * width / s.tp * c)


def _vision(led: Ledger, s: ActivationSpec, grids: Sequence[tuple[int, int, int]], scatter: bool):
    """Vision tower and mergers on `grids`; `scatter`: their features are placed into the token embeddings."""
    v, c, tr = s.args.vision, s.compute_bytes, s.trainable
    n = sum(t * h * w for t, h, w in grids)
    stat = c if s.kernel == "sdpa" else FP32  # CPU kernels keep them in the input dtype, CUDA in fp32
    feats_grad = tr.vision_encoder or tr.vision_projector
    if tr.vision_encoder:
        led.add("vis.patches", "vision", n * v.patch_dim * c)
        led.add("vis.pos_taps", "vision", n * 4 * (INT64 + c))
        led.add("vis.cos_sin", "vision", 2 * n * v.head_dim * FP32)
        for i in range(v.depth):
            if i in s.checkpointed:  # its input; shared by all blocks: cu_seqlens and the SDPA bool mask
                led.add(f"vis{i}.in", "vision", n * v.hidden_size * c)
                bool_mask = n * n * BOOL if s.kernel == "sdpa" else 0
                led.add("vis.ckpt_args", "vision", (len(segment_lengths(grids)) + 1) * INT32 + bool_mask)
            else:
                _vision_block(led, s, i, n, stat)
    for j, i in enumerate(v.deepstack_visual_indexes):
        # block i's output is block i+1's input: the same tensor
        _merger(led, s, f"ds{j}", f"vis{i + 1}.in" if i + 1 < v.depth else "vis.out", n, stat, True)
    _merger(led, s, "merger", "vis.out", n, stat, False)
    if scatter:
        merged = n / v.spatial_merge_size**2
        led.add("vis.index", "vision", merged * INT64)
        if feats_grad:
            n_ds = len(v.deepstack_visual_indexes)
            led.add("vis.features", "vision", (1 + n_ds) * merged * s.args.text.hidden_size * c)


# -------------------------------------------------------------------------------------------- the model


def _head(led: Ledger, s: ActivationSpec):
    """Final norm and the chunked loss: the label rows of the hidden states, their targets and weights."""
    t, c, b = s.args.text, s.compute_bytes, s.batch
    n = b.tokens / s.cp
    _rms_norm(led, s, "final", "loss", n, t.hidden_size, s.trainable.text_decoder and s.lora is None)
    led.add("loss.rows", "loss", b.labels / s.cp * (t.hidden_size * c + INT64 + FP32) + n * BOOL)


def activation_ledger(s: ActivationSpec) -> Ledger:
    led = Ledger()
    t, v = s.args.text, s.args.vision
    layers = list(range(t.num_hidden_layers)) if s.decoder_layers is None else list(s.decoder_layers)
    if s.has_vision:
        if s.trainable.text_decoder and s.lora is None:
            led.add("embed.ids", "decoder", s.batch.tokens / s.cp * INT64)
        # A micro-batch without media runs the tower on a 1 x merge x merge dummy grid (see TrainModule).
        m = v.spatial_merge_size
        _vision(led, s, s.batch.grids or [(1, m, m)], scatter=bool(s.batch.grids))
    _decoder(led, s, layers, offset=v.depth)
    if s.args.is_moe:  # the aux loss keeps its row weights and expert shares, shared by all layers
        led.add("router.aux", "decoder", s.batch.tokens / s.cp * FP32 + (t.num_experts + 1) * FP32)
    if s.has_head:
        _head(led, s)
    _transient(led, s, layers)
    return led


def _transient(led: Ledger, s: ActivationSpec, layers: Sequence[int]):
    """Backward working set (an estimate, not measured by the tests): the gradients of one block's
    activations, plus its recomputed activations when checkpointed; or one loss chunk's logits."""
    t, c, b = s.args.text, s.compute_bytes, s.batch
    n = b.tokens / s.cp
    probe = Ledger()
    if layers:
        whole = ActivationSpec(**{**s.__dict__, "attention_recompute": False})
        _decoder_layer(probe, whole, layers[0], n, b.tokens * b.tokens)
    block = probe.total()
    recompute = 2 if s.checkpointed else 1
    logits = min(b.labels, s.loss_chunk) * t.vocab_size / s.tp * (c + 2 * FP32)
    led.add("backward.working_set", "transient", max(recompute * block, logits), kind="transient")


@dataclass
class Activations:
    vision: float
    decoder: float
    loss: float
    alive: float  # kept alive until backward without being saved by autograd
    transient: float  # backward working set (estimate)

    @property
    def saved(self) -> float:
        return self.vision + self.decoder + self.loss

    @property
    def peak(self) -> float:
        return self.saved + self.alive + self.transient


def predict_activations(s: ActivationSpec) -> Activations:
    led = activation_ledger(s)
    return Activations(
        vision=led.total("vision"),
        decoder=led.total("decoder"),
        loss=led.total("loss"),
        alive=led.total(kind="alive"),
        transient=led.total(kind="transient"),
    )
