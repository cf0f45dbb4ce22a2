"""A training config -> its plan: the configured layout's estimate and the layouts that fit, fastest first."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace

from vlmtune.errors import ParallelError
from vlmtune.models.qwen3_vl import load_config
from vlmtune.models.qwen3_vl.config import ModelArgs
from vlmtune.models.qwen3_vl.lora import is_adapter
from vlmtune.parallel.context import context_sizes
from vlmtune.parallel.fsdp import AC_MODES
from vlmtune.parallel.layout import even_split, resolve
from vlmtune.parallel.tensor import validate_tensor_parallel

from .config import TrainConfig
from .flops import Trainable, active_decoder_params
from .lora import LoraSetup
from .plan import HEADROOM, RUNTIME_RESERVE_GIB, Context, Estimate, Hardware, estimate, make_workload
from .plan_memory import Layout, Precision, build_meta_model, param_records
from .run_setup import accumulation_steps

MAX_SUGGESTIONS = 5


def lora_setup(cfg: TrainConfig, args: ModelArgs, precision: Precision) -> LoraSetup | None:
    """The adapters the trainer would place for the config's `lora:` section (None without LoRA)."""
    if not cfg.lora.rank:
        return None
    return LoraSetup(
        cfg, args, seed=cfg.train.seed, master_dtype=precision.master, compute_dtype=precision.compute
    )


def max_image_patches(cfg: TrainConfig, args: ModelArgs) -> int:
    """Patches of the largest image the processor makes: data.image_max_pixels, else the checkpoint's
    preprocessor config, else a 2048 x 2048 image (vision attention spans one image)."""
    pixels = cfg.data.image_max_pixels
    if pixels is None:
        path = os.path.join(cfg.model.init_from_hf, "preprocessor_config.json")
        if os.path.exists(path):
            with open(path) as f:
                pre = json.load(f)
            pixels = pre.get("max_pixels") or (pre.get("size") or {}).get("longest_edge")
    return int(pixels or 2048 * 2048) // args.vision.patch_size**2


def make_context(cfg: TrainConfig, hardware: Hardware, vision_share: float | None = None) -> Context:
    args = load_config(cfg.model.init_from_hf)
    precision = Precision.from_config(cfg)
    lora = lora_setup(cfg, args, precision)
    trainable = Trainable.from_freeze(cfg.freeze)
    model = build_meta_model(args, cfg.freeze, precision.master, lora)
    records = param_records(model, nf4=lora is not None and cfg.lora.base_quant == "nf4")
    patches = max_image_patches(cfg, args)

    def make(budget: int):
        return make_workload(cfg, args, budget, vision_share, patches)

    def accumulation(budget: int, dp: int) -> int:
        work = ctx.workload(budget)
        samples = sum(len(b.sample_lengths) for b in work.bins)
        cfg_b = replace(cfg, train=replace(cfg.train, micro_batch_tokens=budget))
        return accumulation_steps(cfg_b, max(1, len(work.bins) // dp), samples, dp)

    ctx = Context(
        args, records, precision, trainable, lora, hardware, make, accumulation, loss_chunk=cfg.loss.chunk_size,
    )  # fmt: skip
    return ctx  # `accumulation` reads ctx's cached workloads


def _divisors(n: int, limit: int | None = None) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and (limit is None or d <= limit)]


def candidate_layouts(ctx: Context, pipeline_ok: bool) -> list[Layout]:
    """Layouts of the world that the trainer runs: tensor parallelism inside a node, pipelines (with tp and
    MoE too; `pipeline_ok` False leaves them out), expert parallelism over data-parallel ranks, HSDP across
    nodes, context parallelism without pipelines (cp sizes Ulysses can run, up to 8). QLoRA (NF4) runs
    without tp and pp."""
    a, hw = ctx.args, ctx.hardware
    nf4 = ctx.lora is not None and ctx.lora.cfg.base_quant == "nf4"
    pipeline_ok = pipeline_ok and not nf4
    out = []
    for tp in [1] if nf4 else _divisors(hw.gpus_per_node):
        try:
            validate_tensor_parallel(a, tp)
        except ParallelError:
            continue
        pps = [1] + ([p for p in _divisors(hw.world // tp, 8) if p > 1] if pipeline_ok else [])
        for pp in pps:
            cps = (
                [c for c in _divisors(hw.world // (tp * pp), 8) if c in context_sizes(a, tp)]
                if pp == 1
                else [1]
            )
            for cp in cps:
                rest = hw.world // (tp * pp * cp)
                for rep in sorted({1, hw.nodes}):
                    if rest % rep:
                        continue
                    shard = rest // rep
                    eps = [e for e in _divisors(shard) if a.text.num_experts % e == 0] if a.is_moe else [1]
                    for ep in eps:
                        split = even_split(a.text.num_hidden_layers, pp) if pp > 1 else []
                        out.append(Layout(rep, shard, tp, pp, ep, cp, split))
    return out


@dataclass
class Plan:
    config: str
    model: dict
    hardware: dict
    precision: dict  # dtype names: master (parameters, optimizer), compute (gathers, activations), reduce
    workload: str
    configured: Estimate | None
    configured_error: str | None
    suggestions: list[Estimate] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        keys = ("config", "model", "hardware", "precision", "workload", "configured_error")
        out = {k: getattr(self, k) for k in keys}
        out["configured"] = self.configured.to_dict() if self.configured else None
        out["suggestions"] = [s.to_dict() for s in self.suggestions]
        out["assumptions"] = self.assumptions
        return out


def suggest(ctx: Context, cfg: TrainConfig, budgets: list[int]) -> list[Estimate]:
    """The fastest layouts that fit with the headroom (smallest peak first if the peak FLOP/s is unknown)."""
    a = ctx.args
    # Tied embeddings under PP keep a second copy of the matrix on the last stage (train/pipeline_rank.py's
    # TiedEmbedding), which the memory model does not count yet: no pipeline suggestions for 2B/4B.
    pipeline_ok = not a.tie_word_embeddings
    fits = []
    for layout in candidate_layouts(ctx, pipeline_ok):
        for budget in budgets:
            for ac in AC_MODES:
                if layout.pp > 1 and ctx.accumulation(budget, layout.dp) < layout.pp:
                    continue  # the pipeline's micro-batches are the step's accumulation steps
                est = estimate(ctx, layout, ac, budget)
                if est.fits:
                    fits.append(est)
    if all(e.tokens_per_s for e in fits):
        fits.sort(key=lambda e: (-e.tokens_per_s, e.peak))
    else:
        fits.sort(key=lambda e: e.peak)
    best, seen = [], set()
    for e in fits:  # one micro-batch size per layout and checkpointing mode: the best one
        key = (repr(e.layout), e.activation_checkpointing)
        if key not in seen:
            seen.add(key)
            best.append(e)
    return best[:MAX_SUGGESTIONS]


def make_plan(
    cfg: TrainConfig, config_path: str, hardware: Hardware, vision_share: float | None = None
) -> Plan:
    ctx = make_context(cfg, hardware, vision_share)
    a = ctx.args
    budget = cfg.train.micro_batch_tokens
    work = ctx.workload(budget)
    configured, error = None, None
    try:
        layout = Layout.from_parallel(resolve(cfg.parallel, hardware.world, a))
        configured = estimate(ctx, layout, cfg.model.activation_checkpointing, budget)
    except ParallelError as e:
        error = str(e)
    budgets = sorted({b for b in (budget // 2, budget, budget * 2) if b >= max(work.longest_sample, 256)})
    n_params = sum(math.prod(r.shape) for r in ctx.records if not is_adapter(r.name))
    active = sum(active_decoder_params(a.text).values())
    return Plan(
        config=config_path,
        model={
            "path": cfg.model.init_from_hf,
            "type": a.model_type,
            "parameters": n_params,
            "active_decoder_parameters": active,
            "decoder_layers": a.text.num_hidden_layers,
            "vision_blocks": a.vision.depth,
            "lora": lora_summary(ctx),
        },
        hardware={
            "gpu": hardware.gpu.name,
            "memory_gib": hardware.gpu.memory_gib,
            "nodes": hardware.nodes,
            "gpus_per_node": hardware.gpus_per_node,
            "peak_tflops": hardware.peak_tflops,
            "efficiency": hardware.efficiency,
        },
        precision={
            k: str(getattr(ctx.precision, k)).replace("torch.", "") for k in ("master", "compute", "reduce")
        },
        workload=work.source,
        configured=configured,
        configured_error=error,
        suggestions=suggest(ctx, cfg, budgets),
        assumptions=assumptions(ctx),
    )


def lora_summary(ctx: Context) -> dict | None:
    """The LoRA run as placed: rank, adapted modules, trainable parameters (adapters by site, modules trained
    whole), how the frozen base is stored."""
    if ctx.lora is None:
        return None
    lo, spec = ctx.lora.cfg, ctx.lora.spec
    return {
        "rank": spec.rank, "alpha": spec.alpha, "dropout": spec.dropout, "targets": list(lo.targets),
        "base_quant": lo.base_quant, "adapted_modules": len(spec.linears) + len(spec.experts),
        "modules_to_save": list(spec.saved),
        "trainable_parameters": sum(math.prod(r.shape) for r in ctx.records if r.trainable),
        "adapter_parameters": spec.adapter_params,
    }  # fmt: skip


def assumptions(ctx: Context) -> list[str]:
    hw = ctx.hardware
    return [
        f"fits = peak <= {1 - HEADROOM:.0%} of GPU memory; the peak includes a {RUNTIME_RESERVE_GIB:g} GiB "
        "runtime reserve (CUDA context, NCCL, allocator)",
        f"time: the FLOPs that run reach {hw.efficiency:.0%} of the dense bf16 peak; FSDP traffic overlaps "
        "compute; tensor-parallel all-reduces and expert and context-parallel all-to-alls do not",
        f"bandwidth per GPU: {hw.gpu.link_gbs:g} GB/s inside a node, "
        f"{hw.inter_node_gbs:g} GB/s between nodes",
        "activations: "
        + (
            "FlashAttention (bf16)"
            if ctx.kernel == "flash"
            else "fp32 compute: SDPA keeps an [L, L] mask per layer (train.mixed_precision=bf16 uses FlashAttention)"
        )
        + "; every token of a micro-batch carries a label",
    ]
