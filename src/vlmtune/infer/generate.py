"""KV-cache generation for the native Qwen3-VL (dense or MoE: only `model.forward` is called).

A batch is left-padded: every prompt ends at the last column, so each decode step appends one column for
all rows. The prompt (with its images/videos) runs once through the model and fills the cache; each decode
step feeds one token per row. Decode positions follow Qwen3-VL's multimodal rope: a vision block advances the
position by `max(h, w)` rather than by its token count, so a generated token sits at
`text position + rope delta = max(prompt positions) + 1 + step`, the same on all three rope axes.

Rows that emit a stop token leave the batch (their cache rows are dropped), so a long answer does not make
the finished rows compute.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from vlmtune.data.batch import MEDIA_KEYS
from vlmtune.models.qwen3_vl import get_rope_index

from .cache import KVCache
from .sampling import SamplingOptions, choose_tokens

GREEDY = SamplingOptions()


@dataclass
class Step:
    """One decode step: the batch rows still generating, the token each chose, and their raw logits."""

    rows: torch.Tensor  # [A] indices into the batch
    tokens: torch.Tensor  # [A]
    logits: torch.Tensor  # [A, V] model output the tokens were chosen from


def left_pad(encoded: list[dict], pad_token_id: int) -> dict:
    """Processor outputs (`input_ids [L]`, optional `position_ids [3, L]` and media) -> one left-padded batch.

    Media tensors are concatenated in row order, as the model expects.
    """
    if not encoded:
        raise ValueError("left_pad: no prompts given")
    length = max(int(e["input_ids"].shape[-1]) for e in encoded)
    b = len(encoded)
    input_ids = torch.full((b, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(b, length, dtype=torch.long)
    with_pos = all("position_ids" in e for e in encoded)
    position_ids = torch.zeros(3, b, length, dtype=torch.long) if with_pos else None
    for i, e in enumerate(encoded):
        ids = e["input_ids"].reshape(-1)
        n = ids.numel()
        input_ids[i, length - n :] = ids
        attention_mask[i, length - n :] = 1
        if with_pos:
            position_ids[:, i, length - n :] = e["position_ids"].reshape(3, n)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_pos:
        batch["position_ids"] = position_ids
    for key in MEDIA_KEYS:
        parts = [e[key] for e in encoded if e.get(key) is not None]
        if parts:
            batch[key] = torch.cat(parts)
    return batch


def _prompt_positions(model, batch: dict, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if batch.get("position_ids") is not None:
        pos = batch["position_ids"]
        return pos.view(3, *input_ids.shape) if pos.ndim == 2 else pos
    a = model.args
    pos, _ = get_rope_index(
        input_ids,
        batch.get("image_grid_thw"),
        batch.get("video_grid_thw"),
        mask,
        image_token_id=a.image_token_id,
        video_token_id=a.video_token_id,
        spatial_merge_size=a.vision.spatial_merge_size,
    )
    return pos


@torch.no_grad()
def stream(
    model,
    batch: dict,
    *,
    max_new_tokens: int,
    sampling: SamplingOptions = GREEDY,
    eos_token_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
) -> Iterator[Step]:
    """Yield one `Step` per generated position until every row has stopped or `max_new_tokens` is reached.

    `batch`: `input_ids [B, L]` (or `[L]`), optional `attention_mask [B, L]` (left padding), optional
    `position_ids [3, B, L]` (computed from the ids and grids when absent) and the media tensors.
    A row stops after emitting one of `eos_token_ids` (the stop token is in that step's `tokens`).
    """
    opts = sampling
    if max_new_tokens <= 0:
        return
    device = next(model.parameters()).device
    input_ids = batch["input_ids"]
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    bsz, length = input_ids.shape
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask.view(bsz, length).long()
    if bool((mask[:, -1] == 0).any()):
        raise ValueError(
            "generation needs left-padded prompts: attention_mask[:, -1] must be 1 for every row"
        )
    positions = _prompt_positions(model, batch, input_ids, mask)
    # The next token's position on every rope axis: one past the largest position of the prompt.
    next_pos = positions.masked_fill(~mask.bool()[None], -1).amax(dim=(0, 2)) + 1  # [B]
    stop = torch.tensor(sorted(set(int(t) for t in eos_token_ids)), dtype=torch.long, device=device)

    seen = None
    if opts.repetition_penalty != 1.0:
        vocab = model.args.text.vocab_size
        seen = torch.zeros(bsz, vocab, dtype=torch.bool, device=device)
        # Padding columns point at the row's last (real) token, so only real tokens count as seen.
        real_ids = torch.where(mask.bool(), input_ids, input_ids[:, -1:])
        seen.scatter_(1, real_ids.to(device), True)

    cache = KVCache(length + max_new_tokens)
    media = {k: batch[k].to(device) for k in MEDIA_KEYS if batch.get(k) is not None}
    out = model(
        input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        cache=cache,
        logits_to_keep=1,
        **media,
    )
    cache.advance(length)
    rows = torch.arange(bsz, device=device)
    mask, next_pos = mask.to(device), next_pos.to(device)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]
        tokens = choose_tokens(logits, opts, seen, generator)
        yield Step(rows=rows, tokens=tokens, logits=logits)
        if step == max_new_tokens - 1:
            return
        keep = ~torch.isin(tokens, stop)
        if not bool(keep.all()):
            if not bool(keep.any()):
                return
            index = keep.nonzero().squeeze(1)
            rows, tokens, mask, next_pos = rows[index], tokens[index], mask[index], next_pos[index]
            seen = seen[index] if seen is not None else None
            cache.reorder(index)
        if seen is not None:
            seen[torch.arange(tokens.numel(), device=device), tokens] = True
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = (next_pos + step).view(1, -1, 1).expand(3, -1, 1)
        out = model(tokens[:, None], attention_mask=mask, position_ids=pos, cache=cache)
        cache.advance(1)


def generate(
    model,
    batch: dict,
    *,
    max_new_tokens: int,
    sampling: SamplingOptions = GREEDY,
    eos_token_ids: Iterable[int] = (),
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New token ids per prompt, without the stop token that ended a row (see `stream` for the arguments).

    `pad_token_id` is only needed to left-pad when `batch` is a list of processor outputs.
    """
    if isinstance(batch, list):
        if pad_token_id is None:
            raise ValueError("generate: pass pad_token_id to batch a list of prompts")
        batch = left_pad(batch, pad_token_id)
    bsz = 1 if batch["input_ids"].ndim == 1 else batch["input_ids"].shape[0]
    stop = set(int(t) for t in eos_token_ids)
    result: list[list[int]] = [[] for _ in range(bsz)]
    for step in stream(
        model,
        batch,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_token_ids=stop,
        generator=generator,
    ):
        for row, tok in zip(step.rows.tolist(), step.tokens.tolist()):
            if tok not in stop:
                result[row].append(tok)
    return result
