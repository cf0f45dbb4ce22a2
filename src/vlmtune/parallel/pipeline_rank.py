"""What one pipeline rank does beyond running its stages: one model over its stages (several under the
interleaved schedule) for the optimizer and checkpoints, and the tied embedding kept equal between the first
decoder stage and the last stage."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from vlmtune.models.qwen3_vl import Qwen3VL

from .collectives import all_reduce_
from .pipeline import PipelineStageModule


def rank_model(models: list[Qwen3VL]) -> Qwen3VL:
    """One model over this rank's stages (several under the interleaved schedule): a shallow Qwen3VL whose
    modules are the stages' own, so the optimizer and checkpoints see layout-free names once."""
    return _merge(models)


def _merge(modules: list):
    present = [m for m in modules if m is not None]
    if len({id(m) for m in present}) <= 1:
        return present[0] if present else None
    if any(m._parameters or m._buffers for m in present):
        raise ValueError(f"{type(present[0]).__name__} with parameters is held by two pipeline stages")
    view = copy.copy(present[0])
    view.__dict__ = {**present[0].__dict__, "_parameters": {}, "_buffers": {}}
    names = dict.fromkeys(name for m in present for name in m._modules)
    merged = {name: _merge([m._modules.get(name) for m in present]) for name in names}
    if isinstance(view, nn.ModuleDict):  # layers / blocks: in global index order
        merged = dict(sorted(merged.items(), key=lambda kv: int(kv[0])))
    view.__dict__["_modules"] = merged
    return view


class TiedEmbedding:
    """Tied embeddings (Qwen3-VL 2B/4B) under pipeline parallelism. The first decoder stage holds the token
    embedding and the last stage the lm_head, each its own copy of the one `[V, D]` matrix. After backward
    the two gradients are summed over the pair of ranks (`sum_grads`; each data / tensor parallel coordinate
    has its own pair). Only the first decoder stage's copy is in the optimizer; after the step it sends the
    new weight to the last stage (`broadcast_weight`). So the copies are equal bit for bit after every step,
    the gradient norm counts the matrix once, and the last stage keeps no optimizer state for it (2 x V x D
    fp32 saved), for one transfer of V x D / (dp x tp) per step beyond Megatron's gradient all-reduce.

    `rank_grid`: global ranks with the pipeline dimension first (the layout mesh's `root.mesh`)."""

    def __init__(self, modules: list[PipelineStageModule], rank_grid: torch.Tensor, pp: int):
        plan = modules[0].plan
        first, last = plan.decoder_start % pp, (plan.num_stages - 1) % pp
        me, self.group, self.src = dist.get_rank(), None, None
        for col in rank_grid.reshape(pp, -1).t().tolist():
            pair = [col[first], col[last]]
            group = dist.new_group(pair)  # every rank creates every pair, in the same order
            if me in pair:
                self.group, self.src = group, col[first]
        self.param, self.owner = None, False
        for m in modules:
            if m.plan.embeds:
                self.param, self.owner = m.model.language_model.embed_tokens.weight, True
            elif m.plan.last:
                self.param = m.model.lm_head.weight

    def _active(self) -> bool:
        return self.param is not None and self.param.requires_grad

    def exclude_from(self, optimizer: torch.optim.Optimizer) -> None:
        """The last stage's copy follows the first decoder stage's: no optimizer state of its own."""
        if self.param is not None and not self.owner:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p is not self.param]

    @torch.no_grad()
    def sum_grads(self) -> None:
        if not self._active():
            return
        if self.param.grad is None:  # e.g. no label token reached the lm_head on this data shard
            self.param.grad = torch.zeros_like(self.param)
        g = self.param.grad
        all_reduce_(g.to_local() if isinstance(g, DTensor) else g, group=self.group)
        if not self.owner:
            self.param.grad = None

    @torch.no_grad()
    def broadcast_weight(self) -> None:
        if not self._active():
            return
        p = self.param
        dist.broadcast(p.to_local() if isinstance(p, DTensor) else p.data, src=self.src, group=self.group)
