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
What is kept follows where gradients flow: the decoder always back-propagates; in the vision tower an op keeps
its tensors only from the first trainable weight or adapter on (flops.py's `vision_flow`, the walk the FLOP
count uses too). A Linear keeps its input when its weight trains or a LoRA adapter reads it; an adapter also
keeps its rank-r projection, and with dropout its own dropped copy of the input and the dropout's noise
(`_linear_in`); a LoRA run's placed `LoraSpec` says which modules have adapters or train whole.
Activation checkpointing keeps, for a checkpointed block, its positional tensor inputs only (the hidden
states, cos/sin, and in the vision tower the segment offsets and the boolean mask). `attention_recompute`
(Megatron's selective recompute) keeps the core attention's inputs but not its statistics or converted mask.
Tested byte for byte against a `saved_tensors_hooks` count on the CPU (tests/test_plan.py, test_plan_lora.py).
Besides what is saved, the model lists what stays alive until backward without being saved (`alive`: the
decoder's boolean mask held by checkpointed layers) and a backward working-set estimate (`transient`), which
the tests do not measure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from vlmtune.models.qwen3_vl.config import ModelArgs
from vlmtune.models.qwen3_vl.lora import LoraSpec

from .flops import BlockFlow, Trainable, changes_of, segment_lengths, trains_of, vision_flow

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
    trainable: Trainable = field(default_factory=Trainable)  # freeze groups (full fine-tuning)
    lora: LoraSpec | None = None  # a LoRA run as placed: base frozen, adapters, modules trained whole
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

    def trains(self, module: str) -> bool:
        """Whether `module`'s own weights train: its freeze group, or under LoRA `modules_to_save`."""
        return trains_of(self.trainable, self.lora)(module)

    def changes(self, module: str) -> bool:
        """Whether `module` adds a gradient path: its weights train or an adapter sits on it."""
        return changes_of(self.trainable, self.lora)(module)


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


def _linear_in(
    led: Ledger, s: ActivationSpec, module: str, key: str, part: str, rows: float, width: float, grad: bool = True
):  # fmt: skip
    """What Linear `module` keeps of its input (`key`, `rows x width` on this rank, `grad`: it needs a
    gradient): the input when its weight trains or its LoRA adapter reads it; the adapter also keeps its
    rank-r projection (for B), and with dropout its own dropped copy of the input and, where the input needs a
    gradient, the dropout's noise (the CPU keeps it in the compute dtype, CUDA a bool mask)."""
    c = s.compute_bytes
    adapted = s.lora is not None and module in s.lora.linears
    dropout = adapted and s.lora.dropout > 0
    if s.trains(module) or (adapted and not dropout):
        led.add(key, part, rows * width * c)
    if dropout:
        noise = (c if s.kernel == "sdpa" else BOOL) if grad else 0
        led.add(f"{module}.dropout", part, rows * width * (c + noise))
    if adapted:
        led.add(f"{module}.lora_A", part, rows * s.lora.rank * c)


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


def _moe(led: Ledger, s: ActivationSpec, name: str, m: str, n: float):
    """Router (fp32 softmax, top-k) and the sorted-by-expert SwiGLU of `expert_mlp` (or its EP variant); `m`
    the layer's module name. Expert adapters keep, per row, the input of each adapted projection and its
    rank-r projection."""
    t, c = s.args.text, s.compute_bytes
    h, i, e, k = t.hidden_size, t.moe_intermediate_size, t.num_experts, t.num_experts_per_tok
    rows = n * k
    experts = f"{m}.mlp.experts"
    trains = s.trains(experts)
    adapted = s.lora.experts.get(experts, ()) if s.lora is not None else ()
    _linear_in(led, s, f"{m}.mlp.gate", f"{name}.post.out", "decoder", n, h)
    led.add(f"{name}.probs", "decoder", n * e * FP32)
    led.add(f"{name}.topk", "decoder", n * k * (INT64 + FP32) + n * FP32)
    # the sort order, the token of each row, and the grouped GEMMs' int32 offsets: one, or with adapters one
    # per grouped GEMM of LoRAExperts (base and two per adapted projection)
    offsets = 2 + 2 * len(adapted) if adapted else 1
    led.add(f"{name}.index", "decoder", 2 * rows * INT64 + offsets * e * INT32)
    # gate|up out, silu out, expert out, its router weights, the weighted out; with trainable (or adapted)
    # projections also their inputs, the rows going in and silu*up (the grouped GEMMs' inputs)
    per_row = 2 * h + 3 * i + 1
    per_row += (h if trains or "gate_up_proj" in adapted else 0) + (
        i if trains or "down_proj" in adapted else 0
    )
    per_row += len(adapted) * s.lora.rank if adapted else 0
    led.add(f"{name}.expert_rows", "decoder", rows * per_row * c)
    if s.ep > 1:  # the rows received from other ranks, sorted by local expert, before the grouped GEMM
        led.add(f"{name}.ep_rows", "decoder", rows * (h * c + INT64))


def _decoder_layer(led: Ledger, s: ActivationSpec, layer: int, n: float, mask: float):
    t, c, tp = s.args.text, s.compute_bytes, s.tp
    name, m = f"dec{layer}", f"language_model.layers.{layer}"
    h, hd = t.hidden_size, t.head_dim
    heads, kv = t.num_attention_heads // tp, t.num_key_value_heads // tp

    def trains(sub: str) -> bool:
        return s.trains(f"{m}.{sub}")

    def linear(sub: str, key: str, width: float):
        _linear_in(led, s, f"{m}.{sub}", f"{name}.{key}", "decoder", n, width)

    _rms_norm(led, s, f"{name}.in", "decoder", n, h, trains("input_layernorm"))
    for proj in ("q_proj", "k_proj", "v_proj"):
        linear(f"self_attn.{proj}", "in.out", h)  # the normed input q, k and v read
    _rms_norm(led, s, f"{name}.qn", "decoder", n * heads, hd, trains("self_attn.q_norm"))
    _rms_norm(led, s, f"{name}.kn", "decoder", n * kv, hd, trains("self_attn.k_norm"))
    _core_attention(led, s, f"{name}.attn", "decoder", n, (heads, kv, hd), mask)
    linear("self_attn.o_proj", "attn.out", heads * hd)
    _rms_norm(led, s, f"{name}.post", "decoder", n, h, trains("post_attention_layernorm"))
    if t.is_sparse_layer(layer):
        _moe(led, s, name, m, n)
        return
    inter = t.intermediate_size // tp
    linear("mlp.gate_proj", "post.out", h)
    linear("mlp.up_proj", "post.out", h)
    led.add(f"{name}.mlp", "decoder", n * inter * c * 3)  # gate out, up out, silu(gate): SwiGLU's backward
    linear("mlp.down_proj", "mlp.prod", inter)  # silu(gate) * up


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


def _vision_block(led: Ledger, s: ActivationSpec, i: int, n: float, stat: int, f: BlockFlow):
    """Vision block `i`: an op keeps its tensors only where a gradient flows (`f`, flops.py's walk)."""
    v, c = s.args.vision, s.compute_bytes
    cw, inter, heads = v.hidden_size, v.intermediate_size // s.tp, v.num_heads // s.tp
    name, m = f"vis{i}", f"visual.blocks.{i}"

    def linear(sub: str, key: str, width: float, grad: bool):
        _linear_in(led, s, f"{m}.{sub}", f"{name}.{key}", "vision", n, width, grad)

    if f.normed:  # LayerNorm 1: its input (the previous block's output), mean, rstd
        led.add(f"{name}.in", "vision", n * cw * c)
        led.add(f"{name}.ln1.stats", "vision", 2 * n * stat)
    for proj in ("q_proj", "k_proj", "v_proj"):
        linear(f"attn.{proj}", "ln1.out", cw, f.normed)  # its output, which q, k and v read
    if f.rotary:
        led.add("vis.cos_sin", "vision", 2 * n * v.head_dim * FP32)  # fp32 rotary
    if f.attention:
        _core_attention(led, s, f"{name}.attn", "vision", n, (heads, heads, v.head_dim), n * n)
    linear("attn.proj", "attn.out", heads * v.head_dim, f.attention)
    if f.normed2:  # LayerNorm 2 input, mean, rstd
        led.add(f"{name}.ln2.in", "vision", n * cw * c)
        led.add(f"{name}.ln2.stats", "vision", 2 * n * stat)
    linear("mlp.linear_fc1", "ln2.out", cw, f.normed2)
    if f.hidden:
        led.add(f"{name}.mlp.fc1_out", "vision", n * inter * c)  # GELU's input
    linear("mlp.linear_fc2", "mlp.gelu_out", inter, f.hidden)


def _merger(
    led: Ledger, s: ActivationSpec, name: str, m: str, source: str, n: float, stat: int, post: bool, f
):
    """A patch merger (module `m`, its `MergerFlow` `f`): LayerNorm (over patches, or over merged tokens
    after the shuffle: `post`), fc1, GELU, fc2."""
    v, c = s.args.vision, s.compute_bytes
    merged = n / v.spatial_merge_size**2
    width = v.hidden_size * v.spatial_merge_size**2
    if f.normed:
        led.add(source, "vision", n * v.hidden_size * c)
        led.add(f"{name}.stats", "vision", 2 * (merged if post else n) * stat)
    _linear_in(led, s, f"{m}.linear_fc1", f"{name}.fc1_in", "vision", merged, width, f.normed)
    if f.hidden:
        led.add(f"{name}.gelu_in", "vision", merged * width / s.tp * c)
    _linear_in(led, s, f"{m}.linear_fc2", f"{name}.fc2_in", "vision", merged, width / s.tp, f.hidden)


def _vision(led: Ledger, s: ActivationSpec, grids: Sequence[tuple[int, int, int]], scatter: bool):
    """Vision tower and mergers on `grids`; `scatter`: their features are placed into the token embeddings."""
    v, c = s.args.vision, s.compute_bytes
    n = sum(t * h * w for t, h, w in grids)
    stat = c if s.kernel == "sdpa" else FP32  # CPU kernels keep them in the input dtype, CUDA in fp32
    flow = vision_flow(v, s.changes)
    if s.trains("visual.patch_embed"):
        led.add("vis.patches", "vision", n * v.patch_dim * c)
    if s.trains("visual.pos_embed"):
        led.add("vis.pos_taps", "vision", n * 4 * (INT64 + c))
    for i, f in enumerate(flow.blocks):
        if i not in s.checkpointed:
            _vision_block(led, s, i, n, stat, f)
        elif f.output:  # recomputed in backward
            # its input, cos/sin, and shared by all blocks: cu_seqlens and the SDPA bool mask
            led.add(f"vis{i}.in", "vision", n * v.hidden_size * c)
            led.add("vis.cos_sin", "vision", 2 * n * v.head_dim * FP32)
            bool_mask = n * n * BOOL if s.kernel == "sdpa" else 0
            led.add("vis.ckpt_args", "vision", (len(segment_lengths(grids)) + 1) * INT32 + bool_mask)
    for j, i in enumerate(v.deepstack_visual_indexes):
        # block i's output is block i+1's input: the same tensor
        source = f"vis{i + 1}.in" if i + 1 < v.depth else "vis.out"
        m = f"visual.deepstack_merger_list.{j}"
        _merger(led, s, f"ds{j}", m, source, n, stat, True, flow.mergers[m])
    _merger(led, s, "merger", "visual.merger", "vis.out", n, stat, False, flow.mergers["visual.merger"])
    if scatter:
        merged = n / v.spatial_merge_size**2
        led.add("vis.index", "vision", merged * INT64)
        feats = sum(f.output for f in flow.mergers.values())  # one feature tensor per merger that needs one
        if feats:
            led.add("vis.features", "vision", feats * merged * s.args.text.hidden_size * c)


# -------------------------------------------------------------------------------------------- the model


def _head(led: Ledger, s: ActivationSpec):
    """Final norm and the chunked loss: the label rows of the hidden states, their targets and weights."""
    t, c, b = s.args.text, s.compute_bytes, s.batch
    n = b.tokens / s.cp
    _rms_norm(led, s, "final", "loss", n, t.hidden_size, s.trains("language_model.norm"))
    led.add("loss.rows", "loss", b.labels / s.cp * (t.hidden_size * c + INT64 + FP32) + n * BOOL)


def activation_ledger(s: ActivationSpec) -> Ledger:
    led = Ledger()
    t, v = s.args.text, s.args.vision
    layers = list(range(t.num_hidden_layers)) if s.decoder_layers is None else list(s.decoder_layers)
    if s.has_vision:
        if s.trains("language_model.embed_tokens"):
            led.add("embed.ids", "decoder", s.batch.tokens / s.cp * INT64)
        # A micro-batch without media runs the tower on a 1 x merge x merge dummy grid (see TrainModule).
        m = v.spatial_merge_size
        _vision(led, s, s.batch.grids or [(1, m, m)], scatter=bool(s.batch.grids))
    _decoder(led, s, layers, offset=v.depth)
    if s.args.is_moe:  # the aux loss keeps each sparse layer's row weights, and the expert shares
        sparse = sum(t.is_sparse_layer(i) for i in layers)
        led.add("router.aux", "decoder", sparse * s.batch.tokens / s.cp * FP32 + (t.num_experts + 1) * FP32)
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
        whole = dataclasses.replace(s, attention_recompute=False)
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
