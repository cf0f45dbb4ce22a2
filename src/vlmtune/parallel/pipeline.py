"""Pipeline parallelism with `torch.distributed.pipelining`, stages cut by MindSpeed-MM's layer lists, each
running the model's own forward (`Qwen3VL.forward`) on the part of the model it holds.

`llm_pp_layers: [6, 10, 10, 10]` gives each stage's number of decoder layers (its length is the number of
stages: `pp` for 1F1B, a multiple of `pp` for the interleaved schedule, rank r holding stages r, r+pp, ...).
`vit_pp_layers: [27, 0, 0, 0]` gives each stage's vision blocks; the tower may span stages (`[10, 17, 0, 0]`):
blocks fill stages from the first, and decoder layers start on the stage holding the last vision blocks
(the vision merger, the token embedding and the scatter of the features sit there).

What travels between stages is only what the next stage cannot compute itself (`StagePlan.outputs`):
- `vision_states [m^2 L, D_vision]`: the vision tower's hidden states while the tower continues;
- `hidden_states [1, L, D]`: the decoder's;
- `deepstack_embeds [n, 1, L, D]`: DeepStack features scattered densely (zeros off the visual positions, so
  adding them is exactly adding the features), from the stage that computes them to the last that needs them;
- `router_stats [2, E]`: MoE assignments and summed router probabilities, pooled over the sparse layers so far.
Everything else about a micro-batch (token ids, positions, sample boundaries, targets, pixels, grids) every
pipeline rank already holds — the ranks of one data shard load the same micro-batches — so each stage looks
it up by the micro-batch index (`mb`, a keyword argument the schedule hands every stage) in `batches`.

Buffers are static: every micro-batch is padded to the pipeline length L (padding is its own sample, trains
nothing, and its rows are dropped from the router statistics), and vision hidden states to `m^2 L` rows, the
most a micro-batch of L tokens can hold (each merged visual token is one placeholder token). A receiving stage
knows the true row count from its own copy of the grids, so no shapes are sent; padding to a per-step maximum
instead would mean re-allocating the schedule's buffers every step. The last stage returns per-position losses
(0 where the target is -100) and, for MoE, the pooled router aux loss as one more column; the schedule's loss
function weighs them (`weighted_loss`), so every loss mode of the trainer stays exact (`scale_grads=False`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from vlmtune.constants import IGNORE_INDEX
from vlmtune.errors import ParallelError
from vlmtune.models.qwen3_vl import ModelArgs, Qwen3VL
from vlmtune.models.qwen3_vl.moe import pooled_aux_loss, router_statistics

from .loss import position_losses


@dataclass
class StagePlan:
    index: int
    num_stages: int
    blocks: list[int]  # global vision block ids
    layers: list[int]  # global decoder layer ids
    decoder_start: int  # the first decoder stage: vision merger, token embedding, features scattered in
    inputs: tuple[str, ...]  # tensors received from the previous stage, in order
    outputs: tuple[str, ...]  # tensors sent to the next stage; ("losses",) on the last stage

    @property
    def embeds(self) -> bool:
        return self.index == self.decoder_start

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.num_stages - 1


def _check_split(args: ModelArgs, llm: list[int], vit: list[int], pp: int) -> int:
    """Validate the layer lists; returns the first decoder stage (where the vision tower ends)."""
    n, layers, depth = len(llm), args.text.num_hidden_layers, args.vision.depth
    if sum(llm) != layers:
        raise ParallelError(
            f"parallel.llm_pp_layers {llm} sums to {sum(llm)}; the model has {layers} decoder layers"
        )
    if n % pp:
        raise ParallelError(f"parallel.llm_pp_layers has {n} stages; it must be a multiple of pp={pp}")
    if len(vit) != n or sum(vit) != depth or min(vit) < 0:
        raise ParallelError(
            f"parallel.vit_pp_layers {vit} must have {n} entries summing to the vision depth {depth}"
        )
    text_start = max((i for i, v in enumerate(vit) if v), default=0)
    if any(v == 0 for v in vit[:text_start]):
        raise ParallelError(
            f"parallel.vit_pp_layers {vit}: vision blocks fill stages from the first, without a gap"
        )
    if any(llm[:text_start]):
        raise ParallelError(
            f"parallel.llm_pp_layers {llm} with vit_pp_layers {vit}: decoder layers need the vision features, "
            f"so stages before the last vision stage ({text_start}) hold none, e.g. "
            f"{[0] * text_start + [layers - sum(llm[text_start + 1 :])] + llm[text_start + 1 :]}"
        )
    empty = [i for i in range(n) if not llm[i] and not vit[i]]
    if empty:
        raise ParallelError(f"pipeline stage(s) {empty} would hold no vision block and no decoder layer")
    if args.tie_word_embeddings and text_start % pp == (n - 1) % pp:
        raise ParallelError(
            f"tied embeddings: the token embedding (stage {text_start}) and the lm_head (stage {n - 1}) would "
            "sit on the same rank in different stages; move vision blocks or use fewer stages per rank"
        )
    return text_start


def plan_stages(
    args: ModelArgs, llm_pp_layers: list[int], vit_pp_layers: list[int] | None, pp: int
) -> list[StagePlan]:
    """Every stage's blocks, layers and boundary tensors (see the module docstring)."""
    n, depth = len(llm_pp_layers), args.vision.depth
    vit = list(vit_pp_layers) if vit_pp_layers else [depth] + [0] * (n - 1)
    text_start = _check_split(args, list(llm_pp_layers), vit, pp)
    block_stage = [i for i, count in enumerate(vit) for _ in range(count)]
    layer_stage = [i for i, count in enumerate(llm_pp_layers) for _ in range(count)]
    deepstack = [(block_stage[b], layer_stage[k]) for k, b in enumerate(args.vision.deepstack_visual_indexes)]

    def boundary(i: int) -> tuple[str, ...]:  # what stage i sends to stage i + 1
        names = ["vision_states" if i < text_start else "hidden_states"]
        if any(made <= i < used for made, used in deepstack):
            names.append("deepstack_embeds")
        if args.is_moe and i >= text_start:
            names.append("router_stats")
        return tuple(names)

    return [
        StagePlan(
            index=i,
            num_stages=n,
            decoder_start=text_start,
            blocks=[b for b, s in enumerate(block_stage) if s == i],
            layers=[k for k, s in enumerate(layer_stage) if s == i],
            inputs=boundary(i - 1) if i else (),
            outputs=boundary(i) if i < n - 1 else ("losses",),
        )  # fmt: skip
        for i in range(n)
    ]


def prune(model: Qwen3VL, plan: StagePlan) -> Qwen3VL:
    """Set the modules the stage does not own to None (and delete its layers and blocks elsewhere). A tied
    last stage keeps the embedding module: it is the lm_head's weight (never called there)."""
    lm, vis, a = model.language_model, model.visual, model.args
    for key in [k for k in lm.layers if int(k) not in plan.layers]:
        del lm.layers[key]
    if not plan.blocks:
        model.visual = None
    else:
        for key in [k for k in vis.blocks if int(k) not in plan.blocks]:
            del vis.blocks[key]
        if not plan.first:
            vis.patch_embed = vis.pos_embed = None
        if not plan.embeds:
            vis.merger = None
        for j, block in enumerate(a.vision.deepstack_visual_indexes):
            if block not in plan.blocks:
                vis.deepstack_merger_list[j] = None
    if not plan.embeds and not (plan.last and a.tie_word_embeddings):
        lm.embed_tokens = None
    if not plan.last:
        lm.norm = None
        model.lm_head = None
    return model


@dataclass
class StageInputs:
    """One micro-batch as every stage sees it, padded to the pipeline length (held by each rank, not sent)."""

    input_ids: torch.Tensor  # [1, L]
    position_ids: torch.Tensor  # [3, 1, L]
    cu_seqlens: torch.Tensor  # sample boundaries; the padding is one more sample
    targets: torch.Tensor  # [L], IGNORE_INDEX where nothing is trained
    row_weights: torch.Tensor  # [L] fp32: 1 real token, 0 padding (router statistics)
    media: dict  # pixel values and grids, by the model's keyword names
    num_tokens: int  # real tokens
    num_patches: int  # vision patches of the micro-batch (rows of `vision_states`)
    max_seqlen: int  # the longest sample, the padding included (FlashAttention varlen, known on the host)


def stage_inputs(batch, length: int, device, pad_id: int = 0) -> StageInputs:
    """A `PackedBatch` (or None: an empty micro-batch that only fills the schedule) padded to `length`."""
    n = 0 if batch is None else batch.num_tokens
    if n > length:
        raise ValueError(f"micro-batch of {n} tokens exceeds the pipeline length {length}")
    pad = length - n
    long = dict(dtype=torch.long)
    ids = torch.full((1, length), pad_id, **long)
    pos = torch.zeros(3, 1, length, **long)
    targets = torch.full((length,), IGNORE_INDEX, **long)
    cu, media, patches, longest = torch.tensor([0]), {}, 0, pad
    if batch is not None:
        ids[:, :n], pos[..., :n], targets[:n] = batch.input_ids, batch.position_ids, batch.targets[0]
        cu, media = batch.cu_seqlens.long(), batch.media()
        patches = sum(int(g.prod(-1).sum()) for k, g in media.items() if k.endswith("grid_thw"))
        longest = max(batch.max_seqlen, pad)
    if pad:
        cu = torch.cat([cu, cu.new_tensor([length])])
    weights = (torch.arange(length) < n).float()

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    return StageInputs(
        move(ids), move(pos), move(cu.to(torch.int32)), move(targets), move(weights),
        {k: move(v) for k, v in media.items()}, n, patches, longest,
    )  # fmt: skip


class PipelineStageModule(nn.Module):
    """One stage: the model pruned to the stage's modules (parameter names unchanged under `model.`, so
    checkpoints are layout-free), run by `Qwen3VL.forward`. `batches` (the step's `StageInputs`) is set before
    each schedule step; the stage receives its plan's `inputs` and returns its `outputs`."""

    def __init__(self, model: Qwen3VL, plan: StagePlan, *, length: int = 0, dtype=torch.float32):
        super().__init__()
        self.plan, self.length, self.dtype = plan, length, dtype
        self.model = prune(model, plan)
        self.batches: list[StageInputs] = []
        self.chunk_size = 4096
        # Under FSDP every data-parallel rank must gather the same vision units: a micro-batch without media
        # runs this stage's part of the tower on a dummy grid and adds 0 x its output (see TrainModule).
        self.dummy_vision = False
        t = model.args.text
        self.sparse_layers = sum(t.is_sparse_layer(i) for i in range(t.num_hidden_layers))

    def boundary(self, names: tuple[str, ...], device) -> tuple[torch.Tensor, ...]:
        """Example tensors of a stage boundary (static shapes for PipelineStage); float ones carry gradients."""
        a, length = self.model.args, self.length
        shapes = {
            "vision_states": ((a.vision.spatial_merge_size**2 * length, a.vision.hidden_size), self.dtype),
            "hidden_states": ((1, length, a.text.hidden_size), self.dtype),
            "deepstack_embeds": (
                (len(a.vision.deepstack_visual_indexes), 1, length, a.text.hidden_size),
                self.dtype,
            ),
            "router_stats": ((2, a.text.num_experts), torch.float32),
            "losses": ((1, length + int(a.is_moe)), torch.float32),
        }
        return tuple(
            torch.zeros(shapes[n][0], dtype=shapes[n][1], device=device, requires_grad=n != "losses")
            for n in names
        )

    def forward(self, *received: torch.Tensor, mb: torch.Tensor):
        batch = self.batches[int(mb.reshape(-1)[0])]  # a CPU tensor: no device sync
        given = dict(zip(self.plan.inputs, received))
        stats = given.pop("router_stats", None)
        if "vision_states" in given:
            given["vision_states"] = (
                given["vision_states"][: batch.num_patches] if batch.num_patches else None
            )
        vis = self.model.visual
        dummy = None
        if self.dummy_vision and vis is not None and not batch.num_patches:
            # Before the decoder, as where a micro-batch with media runs the tower: same unit order on every rank.
            dummy = vis.dummy_pass(batch.input_ids.device)
        out = self.model(
            batch.input_ids, position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens,
            max_seqlen=batch.max_seqlen, return_hidden=True, **self._media(batch), **given,
        )  # fmt: skip
        if self.model.args.is_moe and self.plan.layers:
            stats = router_statistics(self.model, batch.row_weights, into=stats)
        if self.plan.last:
            return self._losses(out.hidden_states, batch, stats, dummy)
        return self._send(out, stats, received, dummy)

    def _media(self, batch: StageInputs) -> dict:
        """Pixels for the stage embedding patches; grids alone for a stage continuing the tower."""
        vis = self.model.visual
        if vis is None:
            return {}
        if vis.patch_embed is not None:
            return batch.media
        return {k: v for k, v in batch.media.items() if k.endswith("grid_thw")}

    def _losses(self, hidden, batch: StageInputs, stats, dummy) -> torch.Tensor:
        losses = position_losses(hidden[0], self.model.lm_head.weight, batch.targets, self.chunk_size)
        if self.model.args.is_moe:
            rows = max(batch.num_tokens, 1) * self.sparse_layers
            aux = pooled_aux_loss(stats, rows).float() if stats is not None else losses.new_zeros(())
            losses = torch.cat([losses, aux.view(1)])
        if dummy is not None:
            losses = losses + 0.0 * dummy
        # A fresh tensor, not a view: FSDP hooks the stage output for its backward.
        return losses.unsqueeze(0).clone()

    def _send(self, out, stats, received, dummy) -> tuple[torch.Tensor, ...]:
        values = {
            "vision_states": out.vision_states,
            "hidden_states": out.hidden_states,
            "deepstack_embeds": out.deepstack_embeds,
            "router_stats": stats,
        }
        sent = []
        for name, empty in zip(self.plan.outputs, self.boundary(self.plan.outputs, "meta")):
            t = values[name]
            if t is None:  # nothing of this kind in the micro-batch
                t = torch.zeros(empty.shape, dtype=empty.dtype, device=self.batches[0].input_ids.device)
            elif name == "vision_states":
                t = F.pad(t, (0, 0, 0, empty.shape[0] - t.shape[0]))
            elif any(t is r for r in received):
                t = t.clone()  # passed through unchanged: send a fresh tensor
            sent.append(t)
        if dummy is not None:
            sent[0] = sent[0] + 0.0 * dummy.to(sent[0].dtype)
        return tuple(sent)


def weighted_loss(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The schedule's loss: the last stage's per-position losses (and aux column) times their weights."""
    return (out.float() * weights).sum()


def build_pipeline(
    model_factory: Callable[[], Qwen3VL],
    pp_mesh,
    *,
    llm_pp_layers: list[int],
    vit_pp_layers: list[int] | None,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = weighted_loss,
    schedule: str = "1f1b",
    length: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    wrap: Callable[[PipelineStageModule], nn.Module] | None = None,
):
    """Build this rank's stage modules (one per owned stage) and the schedule.

    `model_factory()` returns a fresh model (on meta or with weights, tensor parallelism already applied);
    each owned stage prunes its own copy. `wrap(stage_module)` may apply FSDP / EP / activation checkpointing
    before the stage is registered. Every micro-batch is padded to `length` tokens; `dtype` is the
    activations' dtype between stages. Stage shapes are given statically (no metadata inference run on
    placeholder inputs). Run a step with `set_batches` then `schedule.step(mb=torch.arange(M), target=...)`.
    Returns (schedule, stage_modules).
    """
    pp, rank = pp_mesh.size(), pp_mesh.get_local_rank()
    probe = model_factory()
    plans = plan_stages(probe.args, llm_pp_layers, vit_pp_layers, pp)
    n_stages = len(plans)
    if schedule == "1f1b" and n_stages != pp:
        raise ParallelError(f"schedule 1f1b needs exactly pp={pp} stages, llm_pp_layers has {n_stages}")
    if schedule == "interleaved" and (n_stages < 2 * pp or n_microbatches % pp):
        raise ParallelError(
            f"the interleaved schedule needs >= 2 stages per rank (llm_pp_layers has {n_stages} for pp={pp}) "
            f"and micro-batches divisible by pp (got {n_microbatches})"
        )
    device = device or torch.device("cpu")
    stages, modules = [], []
    for plan in plans[rank::pp]:
        model = probe if plan is plans[rank] else model_factory()
        module = PipelineStageModule(model, plan, length=length, dtype=dtype)
        modules.append(module)
        inputs, outputs = module.boundary(plan.inputs, device), module.boundary(plan.outputs, device)
        stages.append(
            PipelineStage(
                wrap(module) if wrap else module,
                plan.index,
                n_stages,
                device,
                input_args=inputs,
                output_args=outputs,
                group=pp_mesh.get_group(),
            )  # fmt: skip
        )
    if schedule == "1f1b":
        sched = Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    elif schedule == "interleaved":
        sched = ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        raise ParallelError(f"parallel.pp_schedule must be '1f1b' or 'interleaved', got {schedule!r}")
    return sched, modules


def set_batches(modules: list[PipelineStageModule], batches: list, length: int, device) -> None:
    """The step's micro-batches (`PackedBatch`, or None for an empty filler) on every stage of this rank."""
    inputs = [stage_inputs(b, length, device) for b in batches]
    for m in modules:
        m.batches = inputs
