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


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for next-token prediction: `out[:, i] = labels[:, i + 1]`, IGNORE_INDEX at each sample's last token."""
    out = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    if cu_seqlens is not None:
        out[:, (cu_seqlens[1:-1] - 1).long()] = IGNORE_INDEX
    return out


class Qwen3VL(nn.Module):
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

    # ----------------------------------------------------------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
        """Token embeddings with vision features scattered in; returns (embeds, visual_index, deepstack)."""
        a = self.args
        patches, grids, kinds = [], [], []
        if pixel_values is not None:
            patches.append(pixel_values)
            grids.append(image_grid_thw)
            kinds.append(("image", a.image_token_id, image_grid_thw))
        if pixel_values_videos is not None:
            patches.append(pixel_values_videos)
            grids.append(video_grid_thw)
            kinds.append(("video", a.video_token_id, video_grid_thw))
        if not patches:
            return self.language_model.embed_tokens(input_ids), None, None
        # One pass over images and videos together: attention is per image/frame-pair anyway. The tower runs
        # before the token embedding, as the dummy pass of a rank without media does (train/step.py): under
        # FSDP every rank gathers the sharded units in the same order.
        dtype = self.visual.patch_embed.proj.weight.dtype
        feats, deepstack = self.visual(torch.cat(patches).to(dtype), torch.cat(grids))
        h = self.language_model.embed_tokens(input_ids)
        b, n, d = h.shape
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
        visual_index = torch.cat(index)
        h = h.reshape(b * n, d).index_copy(0, visual_index, feats.to(h.dtype)).view(b, n, d)
        return h, visual_index, deepstack

    def forward(
        self,
        input_ids: torch.Tensor,
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
    ) -> ModelOutput:
        """Padded batch (`attention_mask [B, L]`), packed row (`B == 1`, `cu_seqlens`, per-sample
        `position_ids [3, 1, L]`) or cached decode (`cache`, explicit `position_ids`).

        `return_hidden=True` skips the lm_head and returns the final hidden states (chunked losses).
        `max_seqlen` (the longest packed sample, a host int) spares FlashAttention a device sync; computed
        here once if not given.
        """
        a = self.args
        if cu_seqlens is not None and input_ids.shape[0] != 1:
            raise ValueError("packed input (cu_seqlens) must be a single row: input_ids [1, L]")
        if attention_mask is not None and bool(attention_mask.all()):
            # No padding (training or an unpadded generation prefill): causal attention without an [L, L] mask
            # (FlashAttention through SDPA on CUDA), identical; decode steps then need no mask either.
            attention_mask = None
        h, visual_index, deepstack = self.embed(
            input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
        )
        position_ids = self.positions(
            input_ids, position_ids, image_grid_thw, video_grid_thw, attention_mask, cu_seqlens, cache
        )
        cos, sin = text_rope_cos_sin(
            position_ids.to(h.device), a.text.head_dim, a.text.rope_theta, a.text.mrope_section, h.dtype
        )
        lq = input_ids.shape[1]
        s = lq + (cache.seq_len if cache is not None else 0)
        mask = None
        if uses_varlen(h) and cu_seqlens is not None:  # FlashAttention varlen: no [L, L] mask
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # one sync per forward
        else:
            mask = build_mask(
                lq, s, causal=True, attention_mask=attention_mask, cu_seqlens=cu_seqlens, device=h.device
            )
        h = self.language_model(
            h, cos, sin, visual_index=visual_index, deepstack=deepstack, attention_mask=attention_mask,
            cu_seqlens=cu_seqlens, mask=mask, cache=cache, max_seqlen=max_seqlen,
        )  # fmt: skip
        aux = self.aux_loss(attention_mask)
        if return_hidden:
            return ModelOutput(hidden_states=h, aux_loss=aux)
        logits = self.lm_head(h if logits_to_keep <= 0 else h[:, -logits_to_keep:])
        loss = None if labels is None else lm_loss(logits, shift_labels(labels, cu_seqlens))
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux)

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
