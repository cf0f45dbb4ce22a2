"""One optimizer step: the loss-computing root module, the two step strategies (data-parallel and pipeline),
clipping and non-finite handling.

A step strategy turns the step's micro-batches into accumulated gradients and returns the step's loss over
all ranks; the trainer chooses one strategy when it builds the model and never branches on the layout again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from vlmtune.data.batch import PackedBatch
from vlmtune.models.qwen3_vl import Qwen3VL
from vlmtune.parallel.collectives import all_reduce_host
from vlmtune.parallel.context import ContextParallel
from vlmtune.parallel.fsdp import call_lm_head
from vlmtune.parallel.pipeline import set_batches

from .loss import (
    StepNormalizers,
    aux_loss_weight,
    count_labels,
    microbatch_loss,
    step_normalizers,
    token_weights,
)

log = logging.getLogger(__name__)


class TrainModule(nn.Module):
    """Model + loss in one forward (the FSDP root). The chunked loss reads the lm_head weight through
    `parallel.fsdp.call_lm_head`, so FSDP may give the lm_head its own unit, gathered only for the loss.

    A micro-batch without images or videos still runs the vision tower (and every DeepStack merger) on a
    dummy grid whose output joins the loss times zero (`VisionTower.dummy_pass`): under FSDP every rank must
    run the same sharded units forward and backward. For the same reason the token embeddings always require
    grad in training (see `_embeddings_need_grad`)."""

    embedding_and_head_units = True  # FSDP may shard them as their own units (parallel/fsdp.py `_own_units`)

    def __init__(
        self,
        model: Qwen3VL,
        chunk_size: int = 1024,
        aux_coef: float = 0.0,
        context: ContextParallel | None = None,
    ):
        super().__init__()
        self.model = model
        self.chunk_size, self.aux_coef = chunk_size, aux_coef
        self.context = context  # context parallelism: batches are this rank's RowShard of each row
        model.language_model.embed_tokens.register_forward_hook(_embeddings_need_grad)

    def forward(self, batch: PackedBatch, weights: torch.Tensor, aux_weight: float = 0.0) -> torch.Tensor:
        """This micro-batch's share of the step loss: `sum_t weights_t * l_t` (+ its share of the aux loss)."""
        if self.context is not None:
            out, dummy = self.context.forward(self.model, batch)
        else:
            dummy = None
            if not batch.has_media:
                # First, where a batch with images runs the vision tower (before the token embedding): the
                # units must be gathered in the same order on every rank.
                dummy = self.model.visual.dummy_pass(batch.input_ids.device)
            out = self.model(**batch.model_inputs(), max_seqlen=batch.max_seqlen, return_hidden=True)

        def loss_fn(head_weight, hidden):
            return microbatch_loss(hidden, head_weight, batch, weights, self.chunk_size)

        loss = call_lm_head(self.model.lm_head, loss_fn, out.hidden_states)
        if dummy is not None:
            loss = loss + 0.0 * dummy
        if out.aux_loss is not None and self.aux_coef and aux_weight:
            loss = loss + self.aux_coef * aux_weight * out.aux_loss.float()
        return loss


def _embeddings_need_grad(module, args, out):
    """With a frozen text decoder, a text-only micro-batch would skip the decoder's backward while an image
    micro-batch on another rank runs it (to reach the vision tower): FSDP would then wait forever. Making the
    embeddings require grad gives every rank the same backward."""
    if torch.is_grad_enabled() and not out.requires_grad:
        out.requires_grad_(True)
    return out


def to_device(batch: PackedBatch, device) -> PackedBatch:
    """The batch on the compute device, its image/video grids left on the host: the vision tower reads them
    as numbers (segments, FlashAttention's max_seqlen) and would otherwise wait for the GPU to copy them back."""
    moved = batch.to(device)
    return dataclasses.replace(
        moved, image_grid_thw=batch.image_grid_thw, video_grid_thw=batch.video_grid_thw
    )


@dataclass
class StepResult:
    loss: float  # the step's loss in the configured mode (all ranks)
    grad_norm: float
    tokens: int  # input tokens of the step, all ranks
    label_tokens: int
    skipped: bool
    flops: float = 0.0  # model FLOPs of the step over all ranks (filled in by the trainer)


def clip_and_norm(params: list[torch.Tensor], max_norm: float, pp_group=None) -> float:
    """Global gradient norm over all ranks; clips in place when max_norm > 0.

    Gradients are DTensors on different meshes once tensor or expert parallelism joins FSDP (dp x tp, dp
    x ep, dp alone): the norm is taken per (mesh, placements) group, each made whole, then combined on the
    gradients' device."""
    groups: dict = {}
    for p in params:
        g = p.grad
        if g is not None:
            key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
            groups.setdefault(key, []).append(p)
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0, foreach=True)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squares.append(norm.double() ** 2)
    # One host number per step (the step's only sync besides the loss): logged, checked for finiteness.
    local = float(torch.stack(squares).sum()) if squares else 0.0
    # Pipeline stages hold different parameters: add their squares.
    total = math.sqrt(all_reduce_host([local], group=pp_group)[0] if pp_group is not None else local)
    if max_norm > 0 and math.isfinite(total):
        for group in groups.values():
            coef_norm = torch.tensor(total, dtype=torch.float32, device=group[0].grad.device)
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, coef_norm, foreach=True)
    return total


def finish_step(
    optimizer, micro: list[PackedBatch], loss, tokens, label_tokens, clip_grad, on_nan, step, pp_group=None
) -> StepResult:
    """Clip, then step the optimizer unless the loss or the gradient norm is not finite (`train.on_nan`)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = clip_and_norm(params, clip_grad, pp_group)
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if not finite:
        ids = [i for b in micro for i in b.sample_ids]
        msg = f"step {step}: non-finite loss={loss} grad_norm={grad_norm}; this rank's sample ids: {ids}"
        if on_nan == "stop":
            raise FloatingPointError(msg + " (train.on_nan=stop)")
        log.warning("%s -> step skipped (train.on_nan=skip)", msg)
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, tokens, label_tokens, skipped=not finite)


class DataParallelStep:
    """FSDP (with TP / EP / CP inside): the step's micro-batches one after another through `TrainModule`.

    The counts the loss divides by are summed over the data-parallel ranks (`dp_group`; ranks that differ
    only in tensor or context parallelism hold the same data) before the first backward. Under context
    parallelism (`context`) each rank runs its slice of every row with the whole row's loss weights."""

    def __init__(
        self, root: TrainModule, device, dp_size: int, dp_group=None, loss_type: str = "token_mean",
        context: ContextParallel | None = None,
    ):  # fmt: skip
        self.root, self.device, self.dp_size, self.dp_group = root, device, dp_size, dp_group
        self.loss_type, self.context = loss_type, context
        self.cp = context.size if context is not None else 1
        # Every rank holding part of a step's loss; FSDP averages gradients over all of them.
        self.loss_group = context.loss_group if context is not None else dp_group

    def _on_device(self, batch: PackedBatch, w: torch.Tensor):
        """The micro-batch (this rank's slice of it under context parallelism) and its weights on the device."""
        if self.context is not None:
            shard, w = self.context.shard(batch, w)
            return shard.to(self.device), w.to(self.device, non_blocking=True)
        return to_device(batch, self.device), w.to(self.device, non_blocking=True)

    def forward_backward(self, micro: list[PackedBatch]) -> tuple[float, int, int]:
        """Gradients accumulated in `.grad`; returns (step loss over all ranks, tokens, label tokens)."""
        counts = [count_labels(b) for b in micro]
        norm = step_normalizers(counts, group=self.dp_group)
        local = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch, c in zip(micro, counts):
            inputs, w = self._on_device(batch, token_weights(batch, c, norm, self.loss_type))
            share = self.root(inputs, w, aux_loss_weight(c, norm, self.loss_type))
            # FSDP averages gradients over the data- and context-parallel ranks; our shares are already
            # divided by the step totals, so undo it.
            (share * self.dp_size * self.cp).backward()
            local += share.detach().double()
        # The cp ranks of a data shard each count its tokens: 1/cp each.
        tokens = sum(b.num_tokens for b in micro) / self.cp
        loss, tokens = all_reduce_host([local.item(), tokens], group=self.loss_group)
        return loss, round(tokens), int(norm.tokens)

    @torch.no_grad()
    def eval_loss(self, batches: list[PackedBatch]) -> tuple[float, int]:
        """Token-mean loss over `batches` on all ranks (same dummy-vision path as training, so no rank hangs)."""
        unit = StepNormalizers(tokens=1.0, samples=1.0, microbatches=1.0)
        total, tokens = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for batch in batches:
            c = count_labels(batch)
            inputs, w = self._on_device(batch, token_weights(batch, c, unit, "token_mean"))
            total += self.root(inputs, w).double()
            tokens += c.tokens / self.cp
        loss_sum, tokens = all_reduce_host([total.item(), tokens], group=self.loss_group)
        return loss_sum / max(tokens, 1.0), round(tokens)


class PipelineStep:
    """Pipeline parallelism: the step's micro-batches are the schedule's micro-batches, padded to `length`;
    each position's loss weight (`token_weights`, and for MoE the aux-loss weight as one more column) is the
    schedule's target, so every loss mode is exact; the weights undo FSDP's average (x dp_size). With tied
    embeddings the two copies' gradients are summed after backward and the new weight is sent to the last
    stage after the optimizer step (`after_step`)."""

    def __init__(
        self, schedule, stages, info, *, n_microbatches: int, length: int, loss_type: str,
        aux_coef: float = 0.0, tied=None,
    ):  # fmt: skip
        self.schedule, self.stages, self.length, self.loss_type = schedule, stages, length, loss_type
        self.n_microbatches = n_microbatches
        self.aux_coef, self.tied = aux_coef, tied
        self.dp_size, self.dp_group = info.dp_size, info.dp_group
        self.pp_group = info.mesh["pp"].get_group()
        self.device = info.device
        # One rank per data shard reports the losses: the last stage's first tensor-parallel rank.
        self.reports = any(m.plan.last for m in stages) and info.mesh["tp"].get_local_rank() == 0
        self.moe = stages[0].model.args.is_moe

    def _weights(
        self, micro: list[PackedBatch], counts, norm: StepNormalizers, aux_coef: float
    ) -> torch.Tensor:
        rows = []
        for b, c in zip(micro, counts):
            w = F.pad(token_weights(b, c, norm, self.loss_type), (0, self.length - b.num_tokens))
            if self.moe:
                w = F.pad(w, (0, 1), value=aux_coef * aux_loss_weight(c, norm, self.loss_type))
            rows.append(w)
        return torch.stack(rows).float().to(self.device)

    def _run(self, batches: list, weights: torch.Tensor, *, train: bool) -> float:
        """One schedule step (or forward-only pass) over `batches`; the sum of the weighted losses on the
        reporting ranks, 0 elsewhere."""
        set_batches(self.stages, batches, self.length, self.device)
        losses: list = []
        run = self.schedule.step if train else self.schedule.eval
        run(mb=torch.arange(len(batches)), target=weights, losses=losses)
        return sum(float(x.detach()) for x in losses) if self.reports else 0.0

    def forward_backward(self, micro: list[PackedBatch]) -> tuple[float, int, int]:
        counts = [count_labels(b) for b in micro]
        norm = step_normalizers(counts, group=self.dp_group)
        weights = self._weights(micro, counts, norm, self.aux_coef) * self.dp_size
        local = self._run(micro, weights, train=True) / self.dp_size
        if self.tied is not None:
            self.tied.sum_grads()
        (loss,) = all_reduce_host([local])  # one reporting rank per data shard
        (tokens,) = all_reduce_host([sum(b.num_tokens for b in micro)], group=self.dp_group)
        return loss, int(tokens), int(norm.tokens)

    def after_step(self) -> None:
        if self.tied is not None:
            self.tied.broadcast_weight()

    def exclude_tied_copy(self, optimizer) -> None:
        if self.tied is not None:
            self.tied.exclude_from(optimizer)

    @torch.no_grad()
    def eval_loss(self, batches: list[PackedBatch]) -> tuple[float, int]:
        """Token-mean loss over `batches` on all ranks: forward-only schedule runs of `n` micro-batches (the
        training count; the last run filled with empty ones), as many runs on every data shard."""
        n = self.n_microbatches
        runs = int(all_reduce_host([math.ceil(len(batches) / n)], group=self.dp_group, op="max")[0])
        unit = StepNormalizers(tokens=1.0, samples=1.0, microbatches=1.0)
        total, tokens = 0.0, 0
        for r in range(runs):
            chunk = batches[r * n : (r + 1) * n]
            counts = [count_labels(b) for b in chunk]
            weights = self._weights(chunk, counts, unit, 0.0) if chunk else None
            filler = torch.zeros(n - len(chunk), self.length + int(self.moe), device=self.device)
            weights = filler if weights is None else torch.cat([weights, filler])
            total += self._run(chunk + [None] * (n - len(chunk)), weights, train=False)
            tokens += sum(c.tokens for c in counts)
        (loss_sum,) = all_reduce_host([total])
        (tokens,) = all_reduce_host([tokens], group=self.dp_group)
        return loss_sum / max(tokens, 1.0), int(tokens)
