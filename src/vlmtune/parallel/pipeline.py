"""Pipeline parallelism with `torch.distributed.pipelining`, stages split by MindSpeed-MM's layer lists.

`llm_pp_layers: [6, 10, 10, 10]` gives each stage's number of decoder layers (its length is the number of
stages: `pp` for 1F1B, a multiple of `pp` for the interleaved schedule, rank r holding stages r, r+pp, ...).
`vit_pp_layers: [27, 0, 0, 0]` places vision blocks; the whole vision tower must sit on stage 0 (its output
shapes vary per micro-batch, the pipeline's buffers do not).

Between stages travel fixed-shape tensors, so every micro-batch is padded to the same length L:
hidden `[1, L, D]`, positions `[3, 1, L]`, `seq_ids [1, L]` (which packed sample a token belongs to; padding
is its own sample), shifted labels `[1, L]`, and — up to the last stage that needs them — the DeepStack
features scattered into dense `[n_deepstack, 1, L, D]` tensors (zeros off the visual positions, so adding
them is exactly adding the features at those positions). The last stage returns per-token losses `[1, L]`
(0 where the label is -100); the schedule's `loss_fn` sums them divided by the step's normaliser, so every
loss mode of the trainer stays exact (`scale_grads=False`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from vlmtune.constants import IGNORE_INDEX
from vlmtune.errors import ParallelError
from vlmtune.models.qwen3_vl import Qwen3VL
from vlmtune.models.qwen3_vl.attention import build_mask
from vlmtune.models.qwen3_vl.rope import text_rope_cos_sin

from .loss import position_losses


@dataclass
class StagePlan:
    index: int
    layers: list[int]  # global decoder layer ids
    has_vision: bool


def plan_stages(
    num_layers: int, vision_depth: int, llm_pp_layers: list[int], vit_pp_layers: list[int] | None, pp: int
):
    if sum(llm_pp_layers) != num_layers:
        raise ParallelError(
            f"parallel.llm_pp_layers {llm_pp_layers} sums to {sum(llm_pp_layers)}; the model has {num_layers} "
            "decoder layers"
        )
    n = len(llm_pp_layers)
    if n % pp:
        raise ParallelError(f"parallel.llm_pp_layers has {n} stages; it must be a multiple of pp={pp}")
    vit = vit_pp_layers or [vision_depth] + [0] * (n - 1)
    if len(vit) != n or sum(vit) != vision_depth:
        raise ParallelError(
            f"parallel.vit_pp_layers {vit} must have {n} entries summing to the vision depth {vision_depth}"
        )
    if vit[0] != vision_depth:
        raise ParallelError(
            f"parallel.vit_pp_layers {vit}: the vision tower must be entirely on the first stage, e.g. "
            f"{[vision_depth] + [0] * (n - 1)}"
        )
    plans, start = [], 0
    for i, count in enumerate(llm_pp_layers):
        plans.append(StagePlan(i, list(range(start, start + count)), has_vision=i == 0))
        start += count
    return plans


class PipelineStageModule(nn.Module):
    """One stage of Qwen3VL. Keeps the model's parameter names under `model.` (layout-free checkpoints)."""

    def __init__(self, model: Qwen3VL, plan: StagePlan, num_stages: int, carry_deepstack: bool):
        super().__init__()
        self.first, self.last = plan.index == 0, plan.index == num_stages - 1
        self.carry_deepstack = carry_deepstack  # whether this stage's output includes the DeepStack tensor
        lm = model.language_model
        for key in [k for k in lm.layers if int(k) not in plan.layers]:
            del lm.layers[key]
        if not self.first:
            model.visual = None
            lm.embed_tokens = None
        if not self.last:
            lm.norm = None
            model.lm_head = None
        self.model = model
        self.media: list[dict] = []  # first stage: per micro-batch pixel/grid tensors, set before each step
        self.chunk_size = 4096
        # Under FSDP every data-parallel rank must gather the same vision units: a micro-batch without media
        # runs the tower on a dummy grid and adds 0 x its output (see train/step.py TrainModule).
        self.dummy_vision = False

    def forward(self, *inputs: torch.Tensor):
        model, a = self.model, self.model.args
        deepstack = None
        if self.first:
            input_ids, position_ids, seq_ids, labels, mb_index = inputs
            media = self.media[int(mb_index.view(-1)[0])] if self.media else {}
            h, visual_index, ds = model.embed(input_ids, **media)
            if not media and self.dummy_vision and model.visual is not None:
                h = h + 0.0 * model.visual.dummy_pass(h.device).to(h.dtype)
            if ds is not None:
                d = h.shape[-1]
                dense = h.new_zeros(len(ds), h.shape[1], d)
                deepstack = dense.index_copy(1, visual_index, torch.stack(ds).to(h.dtype)).unsqueeze(1)
            elif self.carry_deepstack:
                deepstack = h.new_zeros(len(a.vision.deepstack_visual_indexes), 1, h.shape[1], h.shape[-1])
        else:
            h, position_ids, seq_ids, labels, *rest = inputs
            deepstack = rest[0] if rest else None
        seq = seq_ids.view(-1)
        pos3 = position_ids.transpose(0, 1)  # [1, 3, L] travels; the rotary wants [3, 1, L]
        cu = torch.cat([seq.new_zeros(1), torch.bincount(seq).cumsum(0)]).to(torch.int32)
        cos, sin = text_rope_cos_sin(pos3, a.text.head_dim, a.text.rope_theta, a.text.mrope_section, h.dtype)
        mask = build_mask(
            h.shape[1], h.shape[1], causal=True, attention_mask=None, cu_seqlens=cu, device=h.device
        )
        for key, layer in model.language_model.layers.items():
            h = layer(h, cos, sin, cu_seqlens=cu, mask=mask)
            k = int(key)
            if deepstack is not None and k < deepstack.shape[0]:
                h = h + deepstack[k]
        if not self.last:
            out = (h, position_ids, seq_ids, labels)
            return (*out, deepstack) if self.carry_deepstack else out
        h = model.language_model.norm(h)
        # A fresh tensor, not a view: FSDP hooks the stage output for its backward.
        return position_losses(h[0], model.lm_head.weight, labels[0], self.chunk_size).unsqueeze(0).clone()


def build_pipeline(
    model_factory: Callable[[], Qwen3VL],
    pp_mesh,
    *,
    llm_pp_layers: list[int],
    vit_pp_layers: list[int] | None,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: str = "1f1b",
    length: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    wrap: Callable[[PipelineStageModule], nn.Module] | None = None,
):
    """Build this rank's stage modules (one per owned stage) and the schedule.

    `model_factory()` returns a fresh model (on meta or with weights); each owned stage prunes its own copy.
    `wrap(stage_module)` may apply FSDP / TP / activation checkpointing before the stage is registered.
    Every micro-batch is padded to `length` tokens; `dtype` is the activations' dtype between stages.
    Stage shapes are given statically (no metadata inference run on placeholder inputs).
    Returns (schedule, stage_modules).
    """
    pp, rank = pp_mesh.size(), pp_mesh.get_local_rank()
    probe = model_factory()
    plans = plan_stages(
        probe.args.text.num_hidden_layers, probe.args.vision.depth, llm_pp_layers, vit_pp_layers, pp
    )
    n_stages = len(plans)
    if schedule == "1f1b" and n_stages != pp:
        raise ParallelError(f"schedule 1f1b needs exactly pp={pp} stages, llm_pp_layers has {n_stages}")
    if schedule == "interleaved" and (n_stages < 2 * pp or n_microbatches % pp):
        raise ParallelError(
            f"the interleaved schedule needs >= 2 stages per rank (llm_pp_layers has {n_stages} for pp={pp}) "
            f"and micro-batches divisible by pp (got {n_microbatches})"
        )
    n_ds = len(probe.args.vision.deepstack_visual_indexes)
    last_ds_stage = max((p.index for p in plans if any(layer < n_ds for layer in p.layers)), default=0)
    device = device or torch.device("cpu")
    d = probe.args.text.hidden_size
    stages, modules = [], []
    for plan in plans[rank::pp]:
        model = probe if plan is plans[rank] else model_factory()
        module = PipelineStageModule(model, plan, n_stages, carry_deepstack=plan.index < last_ds_stage)
        modules.append(module)
        prev_carries = 0 < plan.index <= last_ds_stage
        inputs = _stage_io(length, d, n_ds, dtype, device, first=plan.index == 0, carry=prev_carries)
        if plan.index == n_stages - 1:
            outputs = (torch.empty(1, length, dtype=torch.float32, device=device),)
        else:
            outputs = _stage_io(length, d, n_ds, dtype, device, first=False, carry=module.carry_deepstack)
        stages.append(
            PipelineStage(
                wrap(module) if wrap else module,
                plan.index,
                n_stages,
                device,
                input_args=inputs,
                output_args=outputs,
                group=pp_mesh.get_group(),
            )
        )
    if schedule == "1f1b":
        sched = Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    elif schedule == "interleaved":
        sched = ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        raise ParallelError(f"parallel.pp_schedule must be '1f1b' or 'interleaved', got {schedule!r}")
    return sched, modules


def _stage_io(length: int, d: int, n_ds: int, dtype, device, *, first: bool, carry: bool) -> tuple:
    """Example tensors of a stage boundary (static shapes for PipelineStage)."""
    long = dict(dtype=torch.long, device=device)
    if first:  # input_ids, positions, seq_ids, labels, micro-batch index
        return (
            torch.empty(1, length, **long),
            torch.empty(1, 3, length, **long),
            torch.empty(1, length, **long),
            torch.empty(1, length, **long),
            torch.empty(1, 1, **long),
        )
    # Float tensors carry gradients back to the previous stage: mark them so.
    out = (
        torch.empty(1, length, d, dtype=dtype, device=device, requires_grad=True),
        torch.empty(1, 3, length, **long),
        torch.empty(1, length, **long),
        torch.empty(1, length, **long),
    )
    if carry:
        out = (*out, torch.empty(n_ds, 1, length, d, dtype=dtype, device=device, requires_grad=True))
    return out


def stack_microbatches(batches: list, length: int, pad_id: int = 0) -> tuple[tuple, list[dict]]:
    """Packed micro-batches (`PackedBatch`) -> the schedule's whole-batch args (each chunked along dim 0;
    positions are `[M, 3, L]`) and the per-micro-batch media list for the first stage. Each row is padded to
    `length`; padding is its own sample and trains nothing."""
    pad_row = torch.nn.functional.pad
    ids, pos, seq, tgt, media = [], [], [], [], []
    for b in batches:
        n = b.num_tokens
        if n > length:
            raise ValueError(f"micro-batch of {n} tokens exceeds the pipeline length {length}")
        pad = length - n
        seg = torch.bucketize(torch.arange(n), b.cu_seqlens[1:].long(), right=True)
        ids.append(pad_row(b.input_ids, (0, pad), value=pad_id))
        pos.append(pad_row(b.position_ids, (0, pad)).transpose(0, 1))  # [1, 3, L]
        seq.append(torch.cat([seg, torch.full((pad,), len(b.cu_seqlens) - 1)]).unsqueeze(0))
        tgt.append(pad_row(b.targets, (0, pad), value=IGNORE_INDEX))
        media.append(b.media())
    mb_index = torch.arange(len(batches)).view(-1, 1)
    return (torch.cat(ids), torch.cat(pos), torch.cat(seq), torch.cat(tgt), mb_index), media
