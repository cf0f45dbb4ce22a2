"""One optimizer step: the loss-computing root module, gradient accumulation, clipping, NaN handling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from vlmtune.models.qwen3_vl import Qwen3VL
from vlmtune.parallel.pipeline import dummy_vision_pass

from .loss import (
    MicroBatchCounts,
    StepNormalizers,
    aux_loss_weight,
    count_labels,
    microbatch_loss,
    step_normalizers,
)

MODEL_KEYS = (
    "input_ids",
    "position_ids",
    "cu_seqlens",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
)


class TrainModule(nn.Module):
    """Model + loss in one forward, so FSDP's root unit keeps lm_head gathered while the chunked loss reads it.

    A micro-batch without images or videos still runs the vision tower (and every DeepStack merger) on a
    dummy 1x2x2 grid whose output joins the loss times zero: under FSDP every rank must run the same
    sharded units forward and backward, or the ranks that saw images wait forever for the others. For the
    same reason the token embeddings always require grad in training (see `_embeddings_need_grad`)."""

    def __init__(
        self, model: Qwen3VL, loss_type: str = "token_mean", chunk_size: int = 1024, aux_coef: float = 1.0
    ):
        super().__init__()
        self.model = model
        self.loss_type, self.chunk_size, self.aux_coef = loss_type, chunk_size, aux_coef
        model.language_model.embed_tokens.register_forward_hook(_embeddings_need_grad)

    def forward(self, batch: dict, counts: MicroBatchCounts, norm: StepNormalizers) -> torch.Tensor:
        inputs = {k: batch[k] for k in MODEL_KEYS if batch.get(k) is not None}
        dummy = None
        if batch.get("pixel_values") is None and batch.get("pixel_values_videos") is None:
            # Before the decoder, where a batch with images runs the vision tower: the sharded units
            # must be gathered in the same order on every rank.
            dummy = self._dummy_vision(batch["input_ids"].device)
        out = self.model(**inputs, return_hidden=True)
        loss = microbatch_loss(
            out.hidden_states, self.model.lm_head.weight, batch, counts, norm, self.loss_type, self.chunk_size
        )
        if dummy is not None:
            loss = loss + 0.0 * dummy
        if out.aux_loss is not None and self.aux_coef:
            loss = loss + self.aux_coef * aux_loss_weight(counts, norm, self.loss_type) * out.aux_loss.float()
        return loss

    def _dummy_vision(self, device) -> torch.Tensor:
        return dummy_vision_pass(self.model.visual, device)


def _embeddings_need_grad(module, args, out):
    """With a frozen text decoder, a text-only micro-batch would skip the decoder's backward while an image
    micro-batch on another rank runs it (to reach the vision tower): FSDP would then wait forever. Making the
    embeddings require grad gives every rank the same backward."""
    if torch.is_grad_enabled() and not out.requires_grad:
        out.requires_grad_(True)
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class StepResult:
    loss: float  # the step's loss in the configured mode (all ranks)
    grad_norm: float
    tokens: int  # input tokens of the step, all ranks
    label_tokens: int
    skipped: bool


def clip_and_norm(params: list[torch.Tensor], max_norm: float, pp_group=None) -> float:
    """Global gradient norm over all ranks; clips in place when max_norm > 0.

    Gradients are DTensors on different meshes once tensor or expert parallelism joins FSDP (dp x tp, dp
    x ep, dp alone): the norm is taken per (mesh, placements) group, each made whole, then combined."""
    groups: dict = {}
    for p in params:
        g = p.grad
        if g is not None:
            key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
            groups.setdefault(key, []).append(p)
    squares = [torch.zeros((), dtype=torch.float64)]
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0, foreach=True)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squares.append(norm.double() ** 2)
    total = torch.stack(squares).sum()
    if pp_group is not None:  # pipeline stages hold different parameters: add their squares
        dist.all_reduce(total, group=pp_group)
    total = total.sqrt()
    if max_norm > 0 and math.isfinite(float(total)):
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total.float(), foreach=True)
    return float(total)


def forward_backward(
    root: TrainModule, micro_batches: list[dict], device, dp_size: int, dp_group=None
) -> tuple[float, int, int]:
    """Gradients of the step's loss accumulated in `.grad`; returns (step loss over all ranks, tokens, label tokens).

    The counts the loss divides by are all-reduced over the data-parallel ranks (`dp_group`; ranks that
    differ only in tensor parallelism hold the same data) before the first backward."""
    counts = [count_labels(b) for b in micro_batches]
    norm = step_normalizers(counts, group=dp_group)
    local = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for batch, c in zip(micro_batches, counts):
        batch = to_device(batch, device)
        share = root(batch, c, norm)
        # FSDP averages gradients over the data-parallel ranks; our shares are already divided by the step
        # totals, so undo it.
        (share * dp_size).backward()
        local += share.detach().double().cpu()
        tokens += int(batch["input_ids"].numel())
    stats = torch.tensor([float(local), tokens], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(stats, group=dp_group)
    return float(stats[0]), int(stats[1]), int(norm.tokens)


def train_step(
    root: TrainModule,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict],
    *,
    device,
    dp_size: int,
    clip_grad: float,
    on_nan: str,
    step: int,
    dp_group=None,
) -> StepResult:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss, tokens, label_tokens = forward_backward(root, micro_batches, device, dp_size, dp_group)
    return _finish_step(optimizer, params, micro_batches, loss, tokens, label_tokens, clip_grad, on_nan, step)


def pipeline_train_step(
    schedule,
    stages: list,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict],
    *,
    length: int,
    loss_type: str,
    dp_size: int,
    dp_group,
    pp_group,
    clip_grad: float,
    on_nan: str,
    step: int,
) -> StepResult:
    """One optimizer step through the pipeline schedule: the micro-batches of the step are the schedule's
    micro-batches, padded to `length`; each position's loss weight (`token_weights`) is the schedule's
    target, so every loss mode is exact; the schedule's loss function undoes FSDP's average (x dp_size)."""
    import torch.nn.functional as F

    from vlmtune.parallel.pipeline import stack_microbatches

    from .loss import token_weights

    counts = [count_labels(b) for b in micro_batches]
    norm = step_normalizers(counts, group=dp_group)
    weights = torch.stack(
        [
            F.pad(token_weights(b, c, norm, loss_type), (0, length - b["input_ids"].shape[1]))
            for b, c in zip(micro_batches, counts)
        ]
    ).float()
    args, media = stack_microbatches(micro_batches, length)
    device = next(stages[0].parameters()).device
    args = tuple(a.to(device) for a in args)
    for stage in stages:
        stage.media = [{k: v.to(device) for k, v in m.items()} for m in media]
    losses: list = []
    schedule.step(*args, target=weights.to(device), losses=losses)
    local = sum(float(x.detach()) for x in losses) / dp_size  # only the last stage has losses
    tokens = sum(int(b["input_ids"].numel()) for b in micro_batches)
    stats = torch.tensor([local, 0.0], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(stats)  # losses: one last-stage rank per data shard
        t = torch.tensor([float(tokens)], dtype=torch.float64)
        dist.all_reduce(t, group=dp_group)
        tokens = int(t.item())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss = float(stats[0])
    return _finish_step(
        optimizer, params, micro_batches, loss, tokens, int(norm.tokens), clip_grad, on_nan, step, pp_group
    )


def _finish_step(
    optimizer, params, micro_batches, loss, tokens, label_tokens, clip_grad, on_nan, step, pp_group=None
) -> StepResult:
    grad_norm = clip_and_norm(params, clip_grad, pp_group)
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if not finite:
        ids = [i for b in micro_batches for i in b.get("sample_ids", [])]
        rank = dist.get_rank() if dist.is_initialized() else 0
        msg = f"step {step}: non-finite loss={loss} grad_norm={grad_norm}; rank {rank} sample ids: {ids}"
        if on_nan == "stop":
            raise FloatingPointError(msg + " (train.on_nan=stop)")
        print(msg + " -> step skipped (train.on_nan=skip)", flush=True)
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(
        loss=loss, grad_norm=grad_norm, tokens=tokens, label_tokens=label_tokens, skipped=not finite
    )


@torch.no_grad()
def eval_loss(root: TrainModule, batches, device, dp_group=None) -> tuple[float, int]:
    """Token-mean loss over `batches` on all ranks (same dummy-vision path as training, so no rank hangs)."""
    total = torch.zeros(2, dtype=torch.float64)
    unit = StepNormalizers(tokens=1.0, samples=1.0, microbatches=1.0)
    loss_type = root.loss_type
    root.loss_type = "token_mean"
    try:
        for batch in batches:
            c = count_labels(batch)
            total[0] += float(root(to_device(batch, device), c, unit))
            total[1] += c.tokens
    finally:
        root.loss_type = loss_type
    if dist.is_initialized():
        dist.all_reduce(total, group=dp_group)
    return float(total[0] / max(total[1], 1.0)), int(total[1])
