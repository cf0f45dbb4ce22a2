"""Qwen3-VL: vision tower + text decoder + lm_head, with the forward signature users know from transformers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.constants import IGNORE_INDEX

from .attention import build_mask, uses_varlen
from .config import ModelArgs
from .moe import load_balancing_loss
from .rope import get_rope_index, text_rope_cos_sin
from .text import TextDecoder
from .vision import VisionTower


@dataclass
class ModelOutput:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    # A pipeline stage's outputs for the next stage (see `Qwen3VL.forward`):
    deepstack_embeds: torch.Tensor | None = None  # dense DeepStack features `[n, B, L, D]` still to be added
    vision_states: torch.Tensor | None = None  # vision hidden states `[N, D_vision]`: the tower continues


@dataclass
class VisionOutput:
    features: torch.Tensor  # merged features `[N/4, D]`, or hidden states `[N, D_vision]` without the merger
    deepstack: list[torch.Tensor]  # the DeepStack features of this tower's blocks, in block order
    slots: list[int]  # their DeepStack indexes (the decoder layer each is added after)
    index: torch.Tensor  # flat positions of the vision placeholder tokens (images, then videos)


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for next-token prediction: `out[:, i] = labels[:, i + 1]`, IGNORE_INDEX at each sample's last token."""
    out = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    if cu_seqlens is not None:
        out[:, (cu_seqlens[1:-1] - 1).long()] = IGNORE_INDEX
    return out


def dense_deepstack(
    features: list[torch.Tensor],
    slots: list[int],
    index: torch.Tensor,
    like: torch.Tensor,
    count: int,
    into=None,
) -> torch.Tensor:
    """DeepStack features as one dense tensor `[count, B, L, D]` for the hidden states `like [B, L, D]`:
    slot `slots[i]` gets `features[i]` at the flat positions `index`, zeros elsewhere; `into` (the slots of
    earlier pipeline stages, `[n, B, L, D]`) keeps its other slots. Adding a dense slot to the hidden states is
    exactly adding the features at those positions (x + 0 == x)."""
    b, n, d = like.shape
    out = list(into.unbind(0)) if into is not None else [like.new_zeros(b, n, d)] * count
    for slot, feature in zip(slots, features):
        out[slot] = out[slot].reshape(b * n, d).index_add(0, index, feature.to(like.dtype)).view(b, n, d)
    return torch.stack(out)


class Qwen3VL(nn.Module):
    """Qwen3-VL, whole or as one pipeline stage: a stage's model has the modules it does not own set to None
    (vision blocks, decoder layers, mergers, the embedding, the final norm, the lm_head) and runs this same
    forward (see `forward`'s pipeline arguments)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.visual = VisionTower(args.vision)
        self.language_model = TextDecoder(args.text)
        self.lm_head = nn.Linear(args.text.hidden_size, args.text.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """One Parameter for the embedding and the lm_head (2B/4B); a pipeline stage holding only one of
        them has nothing to tie."""
        embed, head = self.language_model.embed_tokens, self.lm_head
        if self.args.tie_word_embeddings and embed is not None and head is not None:
            if head.weight is not embed.weight:
                head.weight = embed.weight

    @property
    def is_pipeline_stage(self) -> bool:
        """Whether this is a pipeline stage's model: a module it does not own is None (its forward then
        leaves the router state to `moe.router_statistics`, which pools it across the stages)."""
        lm, vis = self.language_model, self.visual
        parts = (vis, vis and vis.patch_embed, vis and vis.merger, lm.embed_tokens, lm.norm, self.lm_head)
        return any(part is None for part in parts)

    # ----------------------------------------------------------------------------------------------
    def encode_vision(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        vision_states: torch.Tensor | None = None,
    ) -> VisionOutput | None:
        """The vision tower on all images and videos at once (attention is per image / frame-pair anyway);
        None without media. `vision_states` continues a previous pipeline stage's tower (its grids given)."""
        a = self.args
        media = (
            ("image", a.image_token_id, pixel_values, image_grid_thw),
            ("video", a.video_token_id, pixel_values_videos, video_grid_thw),
        )
        kinds = [
            (kind, token_id, grid)
            for kind, token_id, pixels, grid in media
            if grid is not None and (pixels is not None or vision_states is not None)
        ]
        if not kinds:
            return None
        x = vision_states
        if x is None:
            x = torch.cat([p for p in (pixel_values, pixel_values_videos) if p is not None])
            x = x.to(self.visual.patch_embed.proj.weight.dtype)
        features, deepstack = self.visual(x, torch.cat([grid for _, _, grid in kinds]))
        flat_ids = input_ids.reshape(-1)
        index = []
        for kind, token_id, grid in kinds:
            idx = (flat_ids == token_id).nonzero().squeeze(1)
            count = int(grid.prod(-1).sum()) // a.vision.spatial_merge_size**2
            if idx.numel() != count:
                raise ValueError(
                    f"{kind} placeholder tokens ({idx.numel()}) do not match the {kind} features ({count}) "
                    f"from {kind}_grid_thw={grid.tolist()}"
                )
            index.append(idx)
        return VisionOutput(features, deepstack, self.visual.deepstack_slots(), torch.cat(index))

    def embed(
        self,
        input_ids: torch.Tensor,
        vision: VisionOutput | None,
        deepstack_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | torch.Tensor | None]:
        """Token embeddings with the vision features scattered in -> (embeds, visual_index, deepstack).

        DeepStack is a list of features at `visual_index` (the whole model), or dense `[n, B, L, D]` with
        `visual_index` None when a pipeline stage continues from earlier stages' `deepstack_embeds` or hands
        its features on (no final norm: the decoder continues on a later stage)."""
        h = self.language_model.embed_tokens(input_ids)
        if vision is None:
            return h, None, deepstack_embeds
        b, n, d = h.shape
        h = h.reshape(b * n, d).index_copy(0, vision.index, vision.features.to(h.dtype)).view(b, n, d)
        if deepstack_embeds is None and self.language_model.norm is not None:
            return h, vision.index, vision.deepstack
        if not vision.slots:
            return h, None, deepstack_embeds
        count = len(self.args.vision.deepstack_visual_indexes)
        return (
            h,
            None,
            dense_deepstack(vision.deepstack, vision.slots, vision.index, h, count, deepstack_embeds),
        )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache=None,
        return_hidden: bool = False,
        logits_to_keep: int = 0,
        *,
        hidden_states: torch.Tensor | None = None,
        deepstack_embeds: torch.Tensor | None = None,
        vision_states: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Padded batch (`attention_mask [B, L]`), packed row (`B == 1`, `cu_seqlens`, per-sample
        `position_ids [3, 1, L]`) or cached decode (`cache`, explicit `position_ids`).

        `return_hidden=True` skips the lm_head and returns the final hidden states (chunked losses).

        A pipeline stage passes what earlier stages computed: `vision_states` (the vision tower's hidden
        states, its grids alongside), `hidden_states` (the decoder's, instead of embedding `input_ids`) and
        `deepstack_embeds` (dense DeepStack features). It returns the same fields for the next stage; a stage
        without the final norm returns its decoder output un-normed, and no stage returns an aux loss (the
        pipeline pools the router statistics across stages, `moe.router_statistics`).

        `max_seqlen` (the longest packed sample, a host int) spares FlashAttention a device sync; computed
        here once if not given.
        """
        if cu_seqlens is not None and (hidden_states if input_ids is None else input_ids).shape[0] != 1:
            raise ValueError("packed input (cu_seqlens) must be a single row: input_ids [1, L]")
        if attention_mask is not None and bool(attention_mask.all()):
            # No padding (training or an unpadded generation prefill): causal attention without an [L, L] mask
            # (FlashAttention through SDPA on CUDA), identical; decode steps then need no mask either.
            attention_mask = None
        visual_index, deepstack = None, deepstack_embeds
        if hidden_states is None:
            vision = self.encode_vision(
                input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, vision_states
            )
            # A stage holding vision blocks but not the merger: the tower continues on the next stage.
            if self.visual is not None and self.visual.merger is None:
                return self._vision_stage_output(vision, deepstack_embeds, input_ids)
            h, visual_index, deepstack = self.embed(input_ids, vision, deepstack_embeds)
        else:
            h = hidden_states
        h = self.decode(
            h, input_ids, position_ids, image_grid_thw, video_grid_thw, attention_mask, cu_seqlens, cache,
            visual_index=visual_index, deepstack=deepstack, max_seqlen=max_seqlen,
        )  # fmt: skip
        aux = None if self.is_pipeline_stage else self.aux_loss(attention_mask)
        if self.language_model.norm is None:  # a pipeline stage: the decoder continues on the next stage
            return ModelOutput(hidden_states=h, deepstack_embeds=deepstack)
        if return_hidden:
            return ModelOutput(hidden_states=h, aux_loss=aux)
        logits = self.lm_head(h if logits_to_keep <= 0 else h[:, -logits_to_keep:])
        loss = None if labels is None else lm_loss(logits, shift_labels(labels, cu_seqlens))
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux)

    def _vision_stage_output(self, vision: VisionOutput | None, deepstack_embeds, input_ids) -> ModelOutput:
        """A pipeline stage holding only vision blocks: its hidden states and DeepStack features (dense)."""
        if vision is None:
            return ModelOutput(deepstack_embeds=deepstack_embeds)
        deepstack = deepstack_embeds
        if vision.slots:
            like = vision.features.new_empty(*input_ids.shape, self.args.text.hidden_size)
            n = len(self.args.vision.deepstack_visual_indexes)
            deepstack = dense_deepstack(
                vision.deepstack, vision.slots, vision.index, like, n, deepstack_embeds
            )
        return ModelOutput(vision_states=vision.features, deepstack_embeds=deepstack)

    def decode(
        self, h, input_ids, position_ids, image_grid_thw, video_grid_thw, attention_mask, cu_seqlens, cache,
        *, visual_index=None, deepstack=None, max_seqlen=None,
    ) -> torch.Tensor:  # fmt: skip
        """The decoder layers this model holds (and the final norm, if it holds it) on embeddings `h`."""
        a = self.args
        position_ids = self.positions(
            input_ids, position_ids, image_grid_thw, video_grid_thw, attention_mask, cu_seqlens, cache
        )
        cos, sin = text_rope_cos_sin(
            position_ids.to(h.device), a.text.head_dim, a.text.rope_theta, a.text.mrope_section, h.dtype
        )
        lq = h.shape[1]
        s = lq + (cache.seq_len if cache is not None else 0)
        mask = None
        if uses_varlen(h) and cu_seqlens is not None:  # FlashAttention varlen: no [L, L] mask
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # one sync per forward
        else:
            mask = build_mask(
                lq, s, causal=True, attention_mask=attention_mask, cu_seqlens=cu_seqlens, device=h.device
            )
        return self.language_model(
            h, cos, sin, visual_index=visual_index, deepstack=deepstack, attention_mask=attention_mask,
            cu_seqlens=cu_seqlens, mask=mask, cache=cache, max_seqlen=max_seqlen,
        )  # fmt: skip

    def positions(
        self, input_ids, position_ids, image_grid_thw, video_grid_thw, attention_mask, cu_seqlens, cache
    ):
        """MRoPE positions `[3, B, L]`: given, or computed from the ids and grids for a plain padded batch."""
        a = self.args
        if position_ids is None:
            if cu_seqlens is not None:
                raise ValueError(
                    "packed input needs per-sample position_ids [3, 1, L] (see rope.get_rope_index)"
                )
            if cache is not None and cache.seq_len > 0:
                raise ValueError("cached decoding needs explicit position_ids (the generator computes them)")
            position_ids, _ = get_rope_index(
                input_ids, image_grid_thw, video_grid_thw, attention_mask, image_token_id=a.image_token_id,
                video_token_id=a.video_token_id, spatial_merge_size=a.vision.spatial_merge_size,
            )  # fmt: skip
        if position_ids.ndim == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        return position_ids

    def aux_loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Router load-balancing loss of the last forward, transformers' `aux_loss` (no coefficient; padding
        rows dropped by `attention_mask`), pooled over layers (not a sum of per-layer losses); None for dense
        models. Per-layer shares: each block's `last_aux_loss`."""
        if not self.args.is_moe:
            return None
        return load_balancing_loss(self, attention_mask)


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy (fp32) over the targets that are not IGNORE_INDEX, as transformers' loss."""
    valid = (target != IGNORE_INDEX).sum()
    total = F.cross_entropy(
        logits.float().flatten(0, 1),
        target.flatten().to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / valid.clamp(min=1)


def build_model(args: ModelArgs, *, dtype: torch.dtype | None = None, device="meta") -> Qwen3VL:
    """The model with uninitialised storage: built on the meta device (no memory), then allocated on
    `device` unless that is "meta" (sharding and pruning happen in between, while it is still meta).
    Tied embeddings are re-tied after allocation (`to_empty` makes new tensors)."""
    with torch.device("meta"):
        model = Qwen3VL(args)
    if dtype is not None:
        model = model.to(dtype)
    if str(device) != "meta":
        materialize(model, device)
    return model


def materialize(module: nn.Module, device) -> nn.Module:
    """Allocate a meta-built module (or the root wrapping one) on `device`, uninitialised, and re-tie."""
    module.to_empty(device=device)
    for m in module.modules():
        if isinstance(m, Qwen3VL):
            m.tie_weights()
    return module
