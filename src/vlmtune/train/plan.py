"""`vlmtune plan`: will a training config fit, how fast will it run, and which layouts fit better.

Memory per rank = parameters + gradients + AdamW state (`plan_memory`, exact) + activations of the largest
micro-batch (`plan_activations`; FlashAttention, or SDPA for fp32 compute) + FSDP buffers + a fixed runtime reserve.
Time per step = the FLOPs that run (model FLOPs + activation-checkpointing recompute) at `efficiency` x the
GPU's dense bf16 peak, plus the communication that cannot overlap compute (tensor-parallel all-reduces,
expert all-to-alls, the pipeline bubble); FSDP all-gathers and reduce-scatters are assumed to overlap
compute, so a step takes at least their time. MFU = model FLOPs / (step time x world x peak).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from vlmtune.data.loader import first_fit_decreasing
from vlmtune.models.qwen3_vl.config import ModelArgs
from vlmtune.models.qwen3_vl.lora import LoraSpec

from .flops import PEAK_TFLOPS, Flops, Trainable, changes_of, model_flops, recompute_flops, vision_flow
from .lora import LoraSetup
from .plan_activations import (
    Activations,
    ActivationSpec,
    MicroBatch,
    checkpointed_blocks,
    predict_activations,
)
from .plan_memory import GiB, Layout, Precision, StateMemory, comm_buffers, stages_of_rank, state_memory

RUNTIME_RESERVE_GIB = 3.0  # CUDA context (~0.5), NCCL buffers (~1), allocator caching and fragmentation
HEADROOM = 0.10  # a layout "fits" when it uses at most 90% of the GPU's memory
DEFAULT_EFFICIENCY = 0.5  # share of the dense peak the FLOPs that run reach (matmuls and attention)
INTER_NODE_GBS = 40.0  # GB/s per GPU between nodes (a 400 Gb/s NIC per GPU, NCCL bus bandwidth)


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float  # what the driver reports as total
    peak_key: str | None  # flops.PEAK_TFLOPS entry
    link_gbs: float  # NCCL bus bandwidth per GPU inside a node (NVLink; PCIe for PCIe cards), GB/s


GPUS = {
    "h100-80g": Gpu("H100 SXM 80GB", 79.6, "H100 SXM", 360.0),
    "h100-pcie": Gpu("H100 PCIe 80GB", 79.6, "H100 PCIe", 50.0),
    "h200": Gpu("H200 141GB", 139.8, "H200", 360.0),
    "b200": Gpu("B200 180GB", 178.4, "B200", 720.0),
    "a100-80g": Gpu("A100 SXM 80GB", 79.2, "A100", 230.0),
    "a100-40g": Gpu("A100 SXM 40GB", 39.4, "A100", 230.0),
    "h800": Gpu("H800 SXM 80GB", 79.6, "H800", 160.0),
    "a800": Gpu("A800 SXM 80GB", 79.2, "A800", 160.0),
    "l40s": Gpu("L40S 48GB", 44.4, "L40S", 25.0),
    "rtx4090": Gpu("RTX 4090 24GB", 23.6, "RTX 4090", 25.0),
}


@dataclass
class Hardware:
    gpu: Gpu
    nodes: int = 1
    gpus_per_node: int = 8
    peak_tflops: float | None = None  # None: unknown (no time prediction)
    efficiency: float = DEFAULT_EFFICIENCY
    inter_node_gbs: float = INTER_NODE_GBS

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def bandwidth(self, ranks_spanned: int) -> float:
        """Bytes/s of a collective over `ranks_spanned` consecutive ranks."""
        gbs = self.gpu.link_gbs if ranks_spanned <= self.gpus_per_node else self.inter_node_gbs
        return gbs * 1e9


def make_hardware(
    gpu: str | None, gpu_memory: float | None, nodes: int, per_node: int, peak: float
) -> Hardware:
    """`--gpu NAME` (default h100-80g). `--gpu-memory GiB` alone is an unlisted GPU (H100-class links; its
    peak only from logging.peak_tflops); with `--gpu`, a listed GPU with less memory to spare."""
    g = GPUS[gpu or "h100-80g"]
    if gpu_memory is not None:
        name = g.name if gpu else f"GPU with {gpu_memory:g} GiB"
        g = dataclasses.replace(g, name=name, memory_gib=gpu_memory, peak_key=g.peak_key if gpu else None)
    table = PEAK_TFLOPS[g.peak_key] if g.peak_key else None
    return Hardware(g, nodes, per_node, peak if peak > 0 else table)


# ------------------------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """The micro-batches a token budget makes: the largest (memory) and all of them (time)."""

    budget: int
    largest: MicroBatch
    bins: list[MicroBatch]
    source: str
    longest_sample: int
    # Per micro-batch means over `bins` (filled by `measure_flops`): model FLOPs by part, and the forward
    # FLOPs of one decoder layer / one vision block / one layer's core attention (recompute costs).
    flops: Flops | None = None
    layer_forward: float = 0.0
    block_forward: float = 0.0
    attention_forward: float = 0.0

    @property
    def mean_tokens(self) -> float:
        return sum(b.tokens for b in self.bins) / len(self.bins)

    def measure_flops(self, args: ModelArgs, trainable: Trainable, lora: LoraSpec | None) -> None:
        mean = Flops()
        t = args.text
        for b in self.bins:
            f = model_flops(args, b.sample_lengths, b.grids, trainable=trainable, lora=lora)
            for k in vars(mean):
                setattr(mean, k, getattr(mean, k) + getattr(f, k) / len(self.bins))
            self.layer_forward += recompute_flops(args, b.sample_lengths, decoder_layers=1, vision_blocks=0)
            self.block_forward += recompute_flops(args, [0], b.grids, decoder_layers=0, vision_blocks=1)
            pairs = sum(n * (n + 1) // 2 for n in b.sample_lengths)
            self.attention_forward += 4 * t.num_attention_heads * t.head_dim * pairs
        self.flops = mean
        for k in ("layer_forward", "block_forward", "attention_forward"):
            setattr(self, k, getattr(self, k) / len(self.bins))


def read_length_index(cfg) -> tuple[list[int], list[int] | None, str] | None:
    """(token lengths, vision tokens per sample or None, path) from the loader's cache, or None."""
    cache = getattr(cfg.data, "cache_dir", None)
    path = os.path.join(cache, "length_index.json") if cache else None
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        index = json.load(f)
    keep = [i for i, n in enumerate(index["lengths"]) if n is not None]
    visual = index.get("visual")  # recorded by newer loaders; None: assumed from --vision-share
    lengths = [int(index["lengths"][i]) for i in keep]
    return lengths, ([int(visual[i]) for i in keep] if visual else None), path


def _grids(visual_tokens: int, merge: int, max_patches: int) -> list[tuple[int, int, int]]:
    """`visual_tokens` merged tokens as images of at most `max_patches` patches (t*h*w and h*w matter)."""
    patches, unit = visual_tokens * merge * merge, merge * merge
    cap = max(unit, max_patches // unit * unit)
    out = [(1, merge, cap // merge)] * (patches // cap)
    if patches % cap:
        out.append((1, merge, (patches % cap) // merge))
    return out


def make_workload(
    cfg, args: ModelArgs, budget: int, vision_share: float | None, max_patches: int
) -> Workload:
    """Pack the length index's samples into `budget`-token micro-batches (the loader's first-fit-decreasing),
    or, without an index, full rows of `budget` tokens. Vision tokens: the index's when it records them,
    else `vision_share` of every sample's tokens."""
    merge = args.vision.spatial_merge_size
    share = 0.5 if vision_share is None else vision_share
    found = read_length_index(cfg)
    if found is None:
        # A full row of the longest samples the config allows (data.cutoff_len).
        longest = min(budget, cfg.data.cutoff_len)
        samples = [longest] * (budget // longest) + ([budget % longest] if budget % longest else [])
        mb = MicroBatch(samples, [g for n in samples for g in _grids(int(n * share), merge, max_patches)])
        note = (
            f"no length index: full {budget}-token rows of {longest}-token samples, {share:.0%} vision tokens"
        )
        return Workload(budget, mb, [mb], note, longest)
    lengths, visual, path = found
    fitting = [i for i, n in enumerate(lengths) if n <= budget]
    if not fitting:
        raise ValueError(f"{path}: no sample fits a micro-batch of {budget} tokens")
    vis = visual if visual is not None and vision_share is None else [int(n * share) for n in lengths]
    bins = []
    for members in first_fit_decreasing(fitting, lengths, budget):
        grids = [g for i in members for g in _grids(vis[i], merge, max_patches)]
        bins.append(MicroBatch([lengths[i] for i in members], grids))
    largest = max(bins, key=lambda b: (b.tokens, b.patches))
    note = (
        "vision tokens from the index"
        if visual is not None and vision_share is None
        else f"{share:.0%} vision tokens"
    )
    return Workload(
        budget, largest, bins, f"{path}: {len(fitting)} samples, {note}", max(lengths[i] for i in fitting)
    )


# ------------------------------------------------------------------------------------------ estimation


@dataclass
class Estimate:
    """One layout's prediction (bytes and seconds are per rank of the busiest pipeline stage)."""

    layout: Layout
    activation_checkpointing: str
    micro_batch_tokens: int
    accumulation: int
    states: StateMemory
    activations: Activations
    in_flight: int  # micro-batches whose activations a pipeline stage holds at once
    comm: dict[str, float]
    reserve: float
    memory: float
    step_s: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    time_parts: dict[str, float] = field(default_factory=dict)
    time_note: str = ""  # why no time is predicted

    @property
    def peak(self) -> float:
        """Bytes at the larger of two moments: mid-backward (activations of the micro-batches in flight,
        block buffers) and the end of backward (the root unit's gradients being reduce-scattered)."""
        act = self.activations
        buffers = sum(v for k, v in self.comm.items() if k != "final")
        backward = self.in_flight * (act.saved + act.alive) + act.transient + buffers
        return self.states.total + max(backward, self.comm["final"]) + self.reserve

    @property
    def fits(self) -> bool:
        return self.peak <= (1 - HEADROOM) * self.memory

    def override_line(self) -> str:
        p = self.layout
        parts = [
            f"--parallel.dp_replicate={p.dp_replicate}", f"--parallel.dp_shard={p.dp_shard}",
            f"--parallel.tp={p.tp}", f"--parallel.pp={p.pp}", f"--parallel.ep={p.ep}",
        ]  # fmt: skip
        if p.cp > 1:
            parts.append(f"--parallel.cp={p.cp}")
        if p.pp > 1:
            parts.append(f"'--parallel.llm_pp_layers=[{','.join(map(str, p.llm_pp_layers))}]'")
        parts += [
            f"--model.activation_checkpointing={self.activation_checkpointing}",
            f"--train.micro_batch_tokens={self.micro_batch_tokens}",
        ]
        return " ".join(parts)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(peak_bytes=self.peak, fits=self.fits, override=self.override_line())
        out["activations"].update(saved=self.activations.saved, peak=self.activations.peak)
        return out


@dataclass
class Context:
    """Everything a layout's estimate needs besides the layout."""

    args: ModelArgs
    records: list
    precision: Precision
    trainable: Trainable
    lora: LoraSetup | None  # a LoRA run's adapters, as the trainer places them (its `spec`)
    hardware: Hardware
    make_workload: Callable[[int], Workload]  # micro-batch token budget -> its micro-batches
    accumulation: Callable[[int, int], int]  # (budget, data-parallel size) -> micro-batches per rank per step
    loss_chunk: int = 1024

    @property
    def kernel(self) -> str:
        """FlashAttention runs in bf16 / fp16 only; fp32 compute takes SDPA with the boolean mask."""
        return "sdpa" if self.precision.compute.itemsize == 4 else "flash"

    @property
    def lora_spec(self) -> LoraSpec | None:
        return self.lora.spec if self.lora is not None else None

    _workloads: dict = field(default_factory=dict)

    def workload(self, budget: int) -> Workload:
        if budget not in self._workloads:
            work = self.make_workload(budget)
            work.measure_flops(self.args, self.trainable, self.lora_spec)
            self._workloads[budget] = work
        return self._workloads[budget]


def estimate(ctx: Context, layout: Layout, ac: str, budget: int) -> Estimate:
    a, hw = ctx.args, ctx.hardware
    work = ctx.workload(budget)
    accum = ctx.accumulation(budget, layout.dp)
    ckpt, attention_only = checkpointed_blocks(ac, a.vision.depth, a.text.num_hidden_layers)
    worst = None
    for rank in range(layout.pp):
        layers, first, last = stages_of_rank(layout, a.text.num_hidden_layers, rank)
        states = state_memory(ctx.records, layout, ctx.precision, args=a, rank=rank)
        batch = work.largest
        if layout.pp > 1 and batch.tokens < budget:  # pipeline micro-batches are padded to the budget
            batch = MicroBatch([*batch.sample_lengths, budget - batch.tokens], batch.grids)
        spec = ActivationSpec(
            a, batch, compute_bytes=ctx.precision.compute.itemsize, kernel=ctx.kernel, trainable=ctx.trainable,
            lora=ctx.lora_spec, checkpointed=ckpt, attention_recompute=attention_only, tp=layout.tp, cp=layout.cp,
            ep=layout.ep, decoder_layers=sorted(layers), has_vision=first, has_head=last,
            loss_chunk=ctx.loss_chunk, pipeline=layout.pp > 1,
        )  # fmt: skip
        in_flight = min(layout.pp - rank, accum) if layout.pp > 1 else 1
        est = Estimate(
            layout, ac, budget, accum, states, predict_activations(spec), in_flight,
            comm_buffers(states, ctx.precision), RUNTIME_RESERVE_GIB * GiB, hw.gpu.memory_gib * GiB,
        )  # fmt: skip
        if worst is None or est.peak > worst.peak:
            worst = est
    if not hw.peak_tflops:
        worst.time_note = "unknown peak FLOP/s for this GPU; set --logging.peak_tflops=..."
    elif ctx.precision.compute.itemsize == 4:
        worst.time_note = "not predicted for fp32 compute (the peaks are bf16); --train.mixed_precision=bf16"
    else:
        _predict_time(ctx, worst, ckpt, attention_only)
    return worst


def _busiest_stage(ctx: Context, layout: Layout, f) -> float:
    """FLOPs of the pipeline stage with the most work (the whole model without pipelining)."""
    decoder = f.decoder + f.decoder_attention + f.lora
    if layout.pp == 1:
        return f.total
    n, sizes = ctx.args.text.num_hidden_layers, layout.llm_pp_layers
    first = f.vision + f.vision_attention + f.projector
    return max(
        decoder * k / n + (first if s == 0 else 0.0) + (f.lm_head if s == len(sizes) - 1 else 0.0)
        for s, k in enumerate(sizes)
    )


def _ulysses_bytes(t, layout: Layout, token_bytes: float) -> float:
    """Bytes one rank sends in one pass (forward, backward or recompute) of the decoder's Ulysses all-to-alls
    (parallel/context.py): q/k/v in, the attention output back, `(cp - 1)/cp` of its slice of each, for this
    tensor-parallel rank's heads; key/value heads fewer than cp are repeated first. Not overlapped with
    compute. `token_bytes`: this rank's tokens x the compute dtype's size. (The one vision-feature exchange
    per micro-batch is left out: it is small beside these.)"""
    if layout.cp == 1:
        return 0.0
    heads, kv = t.num_attention_heads // layout.tp, max(t.num_key_value_heads // layout.tp, layout.cp)
    return t.num_hidden_layers * token_bytes * (2 * heads + 2 * kv) * t.head_dim * (layout.cp - 1) / layout.cp


def _predict_time(ctx: Context, est: Estimate, ckpt: frozenset, attention_only: bool) -> None:
    a, hw, layout = ctx.args, ctx.hardware, est.layout
    c = ctx.precision.compute.itemsize
    work = ctx.workload(est.micro_batch_tokens)
    peak = hw.peak_tflops * 1e12
    # A checkpointed vision block is recomputed only where a gradient flows through it.
    blocks = vision_flow(a.vision, changes_of(ctx.trainable, ctx.lora_spec)).blocks
    n_vis = sum(1 for i in ckpt if i < a.vision.depth and blocks[i].output)
    n_dec = sum(1 for i in ckpt if i >= a.vision.depth)
    share = max(layout.llm_pp_layers) / a.text.num_hidden_layers if layout.pp > 1 else 1.0
    recompute = share * n_dec * work.layer_forward + n_vis * work.block_forward
    if attention_only:
        recompute += share * a.text.num_hidden_layers * work.attention_forward
    compute_mb = (_busiest_stage(ctx, layout, work.flops) + recompute) / (layout.tp * layout.cp)
    tokens = work.mean_tokens / layout.cp
    passes = 3 + (1 if ckpt else 0)  # forward, backward (two collectives), recompute
    tp_bytes = ep_bytes = 0.0
    if layout.tp > 1:
        per_layer = tokens * a.text.hidden_size * c * 2 * (layout.tp - 1) / layout.tp
        tp_bytes = passes * a.text.num_hidden_layers * share * per_layer
    if layout.ep > 1:
        sparse = sum(a.text.is_sparse_layer(i) for i in range(a.text.num_hidden_layers)) * share
        rows = tokens * a.text.num_experts_per_tok * a.text.hidden_size * c * (layout.ep - 1) / layout.ep
        ep_bytes = 2 * passes * sparse * rows
    cp_bytes = _ulysses_bytes(a.text, layout, tokens * c) * (2 + (1 if n_dec else 0)) * share
    shard = layout.dp_shard * layout.cp  # FSDP shards over dp_shard x cp
    gathered = sum(est.states.unit_gathered.values())
    reduced = sum(est.states.unit_trainable.values()) * ctx.precision.reduce.itemsize
    fsdp_bytes = (2 * gathered + reduced) * (shard - 1) / shard
    compute_s = compute_mb / (peak * hw.efficiency)
    exposed_s = (
        tp_bytes / hw.bandwidth(layout.tp)
        + ep_bytes / hw.bandwidth(layout.ep * layout.tp)
        + cp_bytes / hw.bandwidth(layout.cp * layout.tp)
    )
    fsdp_s = fsdp_bytes / hw.bandwidth(shard * layout.tp)
    micro_s = max(compute_s + exposed_s, fsdp_s)
    step = (est.accumulation + layout.pp - 1) * micro_s
    if layout.dp_replicate > 1:  # HSDP: gradients all-reduced across replicas once per step
        replicas = layout.dp_replicate
        step += est.states.grads * 2 * (replicas - 1) / replicas / hw.bandwidth(hw.world)
    est.step_s = step
    est.tokens_per_s = est.accumulation * work.mean_tokens * layout.dp / step
    est.mfu = est.accumulation * work.flops.total * layout.dp / (step * layout.world * peak)
    est.time_parts = {
        "compute_s": compute_s, "exposed_comm_s": exposed_s, "fsdp_s": fsdp_s, "micro_batch_s": micro_s,
    }  # fmt: skip
