"""`vlmtune plan CONFIG.yaml`: per-rank memory, step time and MFU of a config, and the layouts that fit."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from vlmtune.errors import VlmtuneError

from .config import load
from .plan import DEFAULT_EFFICIENCY, GPUS, INTER_NODE_GBS, make_hardware
from .plan_search import make_plan

GiB = 2**30
OVERRIDE = re.compile(r"^--[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+=")


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument(
        "--gpu", choices=sorted(GPUS), default=None, help="GPU model (default h100-80g): memory, peak, NVLink"
    )
    p.add_argument(
        "--gpu-memory", type=float, default=None, metavar="GiB",
        help="GPU memory in GiB: an unlisted GPU (give its peak with --logging.peak_tflops=...), or a "
        "listed one with less memory free",
    )  # fmt: skip
    p.add_argument(
        "--efficiency", type=float, default=DEFAULT_EFFICIENCY,
        help=f"share of the dense bf16 peak the FLOPs that run reach (default {DEFAULT_EFFICIENCY})",
    )  # fmt: skip
    p.add_argument(
        "--vision-share", type=float, default=None, metavar="F",
        help="fraction of tokens that are image/video tokens (default: the length index's counts when it "
        "records them, else 0.5)",
    )  # fmt: skip
    p.add_argument(
        "--inter-node-gbs", type=float, default=INTER_NODE_GBS,
        help=f"GB/s per GPU between nodes (default {INTER_NODE_GBS:g})",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="predict per-GPU memory, step time and MFU of a training config, and layouts that fit",
        description=(
            "Reads CONFIG.yaml (with --section.key=value overrides, as `vlmtune train`), the model's "
            "config.json (no weights) and, when it exists, the dataset's length index (data.cache_dir/"
            "length_index.json); prints per-rank parameters, gradients, optimizer state, activations, "
            "FSDP buffers and the total against the GPU's memory, the predicted step time and MFU, and the "
            "fastest layouts that fit with >= 10%% headroom as ready override lines. docs/plan.md explains "
            "every number."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="training YAML config")
    _add_options(p)
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key=value overrides and options")
    p.set_defaults(func=run_plan)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _split_overrides(args) -> str | None:
    """Options given after CONFIG land in `overrides`: parse them; the rest must be --section.key=value."""
    inner = argparse.ArgumentParser(add_help=False, prog="vlmtune plan")
    _add_options(inner)
    try:
        _, rest = inner.parse_known_args(args.overrides, namespace=args)
    except SystemExit:
        return "bad option value (see `vlmtune plan --help`)"
    bad = [a for a in rest if not OVERRIDE.match(a)]
    if bad:
        return f"unknown argument(s) {bad}; see `vlmtune plan --help`; config keys go as --section.key=value"
    args.overrides = rest
    return None


def run_plan(args) -> int:
    problem = _split_overrides(args)
    if problem:
        return _fail(problem)
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.efficiency <= 1 or (args.vision_share is not None and not 0 <= args.vision_share <= 1):
        return _fail("--efficiency must be in (0, 1] and --vision-share in [0, 1]")
    try:
        cfg = load(args.config, args.overrides, check_paths=False)
        model_config = os.path.join(cfg.model.init_from_hf, "config.json")
        if not os.path.exists(model_config):
            where = cfg.model.init_from_hf
            return _fail(f"model.init_from_hf: no config.json in {where!r} (plan needs only that file)")
        hw = make_hardware(args.gpu, args.gpu_memory, args.nodes, args.gpus_per_node, cfg.logging.peak_tflops)
        hw.efficiency, hw.inter_node_gbs = args.efficiency, args.inter_node_gbs
        plan = make_plan(cfg, args.config, hw, args.vision_share)
    except (VlmtuneError, ValueError) as e:
        return _fail(str(e))
    print(json.dumps(plan.to_dict(), indent=2, default=str) if args.json else format_plan(plan))
    return 0


# ---------------------------------------------------------------------------------------------- output


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def _layout_line(e) -> str:
    p = e.layout
    extra = f", cp {p.cp}" if p.cp > 1 else ""
    pipe = f" {p.llm_pp_layers}" if p.pp > 1 else ""
    return (
        f"dp_replicate {p.dp_replicate} x dp_shard {p.dp_shard} x tp {p.tp} x pp {p.pp}{pipe} "
        f"(ep {p.ep}{extra}); "
        f"activation checkpointing {e.activation_checkpointing}; {e.micro_batch_tokens}-token micro-batches, "
        f"{e.accumulation} per rank per step"
    )


def _sharding(p) -> str:
    parts = [f"FSDP 1/{p.dp_shard}"]
    if p.dp_replicate > 1:
        parts.append(f"x{p.dp_replicate} replicas")
    if p.tp > 1:
        parts.append(f"TP 1/{p.tp}")
    if p.ep > 1:
        parts.append(f"experts EP 1/{p.ep}")
    if p.pp > 1:
        parts.append("the busiest pipeline stage")
    return ", ".join(parts)


def _parameters_line(e, precision: dict, lora: dict | None) -> str:
    s, master = e.states, precision["master"]
    if lora is None:
        what = f"{master} master weights, {_sharding(e.layout)}; frozen {s.params_frozen / GiB:.2f}"
    else:
        nf4 = " (decoder Linears NF4)" if lora["base_quant"] == "nf4" else ""
        what = (
            f"frozen base {s.params_frozen / GiB:.2f} in {precision['compute']}{nf4}, trained "
            f"{(s.params - s.params_frozen) / GiB:.2f} in {master}; {_sharding(e.layout)}"
        )
    return f"    parameters        {_gib(s.params)}   {what}"


def format_estimate(e, precision: dict, lora: dict | None = None) -> list[str]:
    s, a, c = e.states, e.activations, e.comm
    master, compute, reduce = precision["master"], precision["compute"], precision["reduce"]
    lines = [
        "  per rank (GiB)"
        + (f", pipeline stages hold {e.in_flight} micro-batches" if e.in_flight > 1 else ""),
        _parameters_line(e, precision, lora),
        f"    gradients         {_gib(s.grads)}   {master}, reduce-scattered in {reduce}",
        f"    optimizer         {_gib(s.optimizer)}   AdamW exp_avg + exp_avg_sq in {master} "
        f"(+ {s.optimizer_host / 2**10:.1f} KiB of step counters on the host)",
        f"    activations       {_gib(a.vision)}   vision tower ({compute})",
        f"                      {_gib(a.decoder)}   decoder",
        f"                      {_gib(a.loss)}   final norm + chunked loss",
        f"                      {_gib(a.alive)}   kept alive by checkpointed layers (masks)",
        f"                      {_gib(a.transient)}   backward working set (estimate)",
        f"    FSDP buffers      {_gib(c['root_gathered'] + c['blocks_gathered'])}   gathered in {compute}: root unit "
        f"{c['root_gathered'] / GiB:.2f}, two blocks {c['blocks_gathered'] / GiB:.2f}",
        f"                      {_gib(c['block_grads'] + c['head_grads'])}   gradients before reduce-scatter "
        f"(end of backward: {c['final'] / GiB:.2f})",
        f"    runtime reserve   {_gib(e.reserve)}",
        f"    peak              {_gib(e.peak)}   of {e.memory / GiB:.1f} ({e.peak / e.memory:.0%}): "
        + ("fits" if e.fits else "DOES NOT FIT with 10% headroom"),
    ]
    if e.step_s is not None:
        t = e.time_parts
        lines += [
            f"  time: {e.step_s:.2f} s per step, {e.tokens_per_s:,.0f} tokens/s over all ranks, "
            f"MFU {e.mfu:.1%}",
            f"    per micro-batch: compute {t['compute_s']:.3f} s + exposed communication "
            f"{t['exposed_comm_s']:.3f} s; FSDP {t['fsdp_s']:.3f} s (overlapped)",
        ]
    else:
        lines.append(f"  time: {e.time_note}")
    return lines


def _lora_lines(lora: dict | None, precision: dict) -> list[str]:
    if lora is None:
        return []
    base = f"frozen base in {precision['compute']}" + (
        ", decoder Linears NF4" if lora["base_quant"] == "nf4" else ""
    )
    saved = f", {', '.join(lora['modules_to_save'])} trained whole" if lora["modules_to_save"] else ""
    return [
        f"lora      rank {lora['rank']} on {lora['adapted_modules']} modules{saved}; {base}; "
        f"{lora['trainable_parameters'] / 1e6:.1f}M trainable parameters in {precision['master']}"
    ]


def format_plan(plan) -> str:
    m, h = plan.model, plan.hardware
    peak = f"{h['peak_tflops']:g} TFLOP/s dense bf16" if h["peak_tflops"] else "peak unknown"
    lines = [
        f"vlmtune plan: {plan.config}",
        f"model     {m['type']}: {m['parameters'] / 1e9:.2f}B parameters, "
        f"{m['active_decoder_parameters'] / 1e9:.2f}B active decoder parameters per token; "
        f"{m['decoder_layers']} decoder layers, {m['vision_blocks']} vision blocks",
        *_lora_lines(m["lora"], plan.precision),
        f"hardware  {h['nodes']} x {h['gpus_per_node']} {h['gpu']} ({h['memory_gib']:g} GiB, {peak})",
        f"data      {plan.workload}",
        "",
    ]
    if plan.configured is not None:
        lines += [
            "configured: " + _layout_line(plan.configured),
            *format_estimate(plan.configured, plan.precision, m["lora"]),
        ]
    else:
        lines.append(f"configured layout cannot run: {plan.configured_error}")
    timed = any(e.tokens_per_s for e in plan.suggestions)
    lines += [
        "",
        "layouts that fit with >= 10% headroom" + (", fastest first:" if timed else ", smallest first:"),
    ]
    for i, e in enumerate(plan.suggestions, 1):
        speed = f"{e.tokens_per_s:9,.0f} tokens/s  MFU {e.mfu:5.1%}  " if e.tokens_per_s else ""
        lines += [f"  {i}. {speed}peak {e.peak / GiB:.1f} GiB", f"     {e.override_line()}"]
    if not plan.suggestions:
        lines.append("  none: more GPUs, a smaller micro_batch_tokens, or freezing more of the model")
    lines += ["", "assumptions:", *(f"  - {a}" for a in plan.assumptions)]
    return "\n".join(lines)
