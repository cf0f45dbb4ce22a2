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
from torch.distributed.tensor import DTensor

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


def _prompt_positions(model_args, batch: dict, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if batch.get("position_ids") is not None:
        pos = batch["position_ids"]
        return pos.view(3, *input_ids.shape) if pos.ndim == 2 else pos
    a = model_args
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


def _whole(logits: torch.Tensor) -> torch.Tensor:
    """Logits a tensor-parallel lm_head left sharded by vocabulary (a DTensor), gathered."""
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


class Decoding:
    """One batch's generation, one forward at a time: `prefill()` runs the prompt and chooses the first token
    of every row; while `more()` (rows that have not stopped, tokens left), `decode()` feeds the last tokens
    and chooses the next. `stream` drives it; ranks that must step together drive it themselves.

    `cache`: a `KVCache` already holding `cache.seq_len` positions of the same (single, unpadded) row, e.g.
    the earlier turns of a chat; `batch` then holds only the new tokens, and `history` the ids in the cache
    (the repetition penalty counts them). `forward` replaces `model(...)` (e.g. a sharded model's entry).
    """

    def __init__(
        self, model, batch: dict, *, max_new_tokens: int, sampling: SamplingOptions = GREEDY,
        eos_token_ids: Iterable[int] = (), generator: torch.Generator | None = None, cache: KVCache | None = None,
        history: torch.Tensor | None = None, forward=None,
    ):  # fmt: skip
        self.forward, self.opts, self.generator = forward or model, sampling, generator
        self.max_new_tokens, self.steps = max_new_tokens, 0
        self.device = device = next(model.parameters()).device
        input_ids = batch["input_ids"]
        self.input_ids = input_ids = input_ids[None] if input_ids.ndim == 1 else input_ids
        bsz, length = input_ids.shape
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.view(bsz, length).long()
        if bool((mask[:, -1] == 0).any()):
            raise ValueError(
                "generation needs left-padded prompts: attention_mask[:, -1] must be 1 for every row"
            )
        past = 0 if cache is None else cache.seq_len
        if past and (bsz != 1 or not bool(mask.all())):
            raise ValueError("continuing a cache takes one unpadded row")
        self.positions = _prompt_positions(model.args, batch, input_ids, mask)
        # The next token's position on every rope axis: one past the largest position of the prompt.
        self.next_pos = (self.positions.masked_fill(~mask.bool()[None], -1).amax(dim=(0, 2)) + 1).to(device)
        self.stop = torch.tensor(sorted(set(int(t) for t in eos_token_ids)), dtype=torch.long, device=device)
        self.seen = None
        if sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(bsz, model.args.text.vocab_size, dtype=torch.bool, device=device)
            # Padding columns point at the row's last (real) token, so only real tokens count as seen.
            real_ids = torch.where(mask.bool(), input_ids, input_ids[:, -1:])
            self.seen.scatter_(1, real_ids.to(device), True)
            if history is not None:
                self.seen.scatter_(1, history.reshape(1, -1).to(device), True)
        self.cache = cache if cache is not None else KVCache(length + max_new_tokens)
        self.cache.reserve(past + length + max_new_tokens)
        self.mask = torch.cat([mask.new_ones(bsz, past), mask], dim=1).to(device)
        self.media = {k: batch[k].to(device) for k in MEDIA_KEYS if batch.get(k) is not None}
        self.rows = torch.arange(bsz, device=device)
        self.tokens: torch.Tensor | None = None

    @torch.no_grad()
    def prefill(self) -> Step:
        out = self.forward(
            self.input_ids.to(self.device),
            attention_mask=self.mask,
            position_ids=self.positions.to(self.device),
            cache=self.cache,
            logits_to_keep=1,
            **self.media,
        )
        self.cache.advance(self.input_ids.shape[1])
        return self._choose(out)

    def more(self) -> bool:
        """Drop the rows whose last token was a stop token; whether a decode step is left to run."""
        if self.tokens is None or self.steps >= self.max_new_tokens:
            return False
        keep = ~torch.isin(self.tokens, self.stop)
        if not bool(keep.all()):
            if not bool(keep.any()):
                self.tokens = None
                return False
            index = keep.nonzero().squeeze(1)
            self.rows, self.tokens = self.rows[index], self.tokens[index]
            self.mask, self.next_pos = self.mask[index], self.next_pos[index]
            self.seen = self.seen[index] if self.seen is not None else None
            self.cache.reorder(index)
        return True

    @torch.no_grad()
    def decode(self) -> Step:
        tokens = self.tokens
        if self.seen is not None:
            self.seen[torch.arange(tokens.numel(), device=self.device), tokens] = True
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        pos = (self.next_pos + self.steps - 1).view(1, -1, 1).expand(3, -1, 1)
        out = self.forward(tokens[:, None], attention_mask=self.mask, position_ids=pos, cache=self.cache)
        self.cache.advance(1)
        return self._choose(out)

    def _choose(self, out) -> Step:
        logits = _whole(out.logits)[:, -1]
        self.tokens = choose_tokens(logits, self.opts, self.seen, self.generator)
        self.steps += 1
        return Step(rows=self.rows, tokens=self.tokens, logits=logits)


@torch.no_grad()
def stream(model, batch: dict, *, max_new_tokens: int, **options) -> Iterator[Step]:
    """Yield one `Step` per generated position until every row has stopped or `max_new_tokens` is reached.

    `batch`: `input_ids [B, L]` (or `[L]`), optional `attention_mask [B, L]` (left padding), optional
    `position_ids [3, B, L]` (computed from the ids and grids when absent) and the media tensors.
    A row stops after emitting one of `eos_token_ids` (the stop token is in that step's `tokens`).
    Options: `sampling`, `eos_token_ids`, `generator`, and `cache` / `history` / `forward` (see `Decoding`).
    """
    if max_new_tokens <= 0:
        return
    decoding = Decoding(model, batch, max_new_tokens=max_new_tokens, **options)
    yield decoding.prefill()
    while decoding.more():
        yield decoding.decode()


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
