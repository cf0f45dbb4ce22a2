"""Next-token choice from logits: repetition penalty, then temperature, top-k and top-p, then sample or argmax.

The order and the definitions are the ones transformers' `generate` uses, so the same logits and the same
random state pick the same token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token in `seen [B, V]` (bool) less likely: positive logits / penalty, negative * penalty."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` highest logits (and any tied with the k-th), -inf elsewhere."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches `p` (at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    tail_mass = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = tail_mass <= 1 - p
    drop_sorted[..., -1] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, opts: SamplingOptions, seen: torch.Tensor | None) -> torch.Tensor:
    """fp32 scores the next token is chosen from (argmax when greedy, else softmax + multinomial)."""
    scores = logits.float()
    if opts.repetition_penalty != 1.0 and seen is not None:
        scores = apply_repetition_penalty(scores, seen, opts.repetition_penalty)
    if opts.greedy:
        return scores
    if opts.temperature != 1.0:
        scores = scores / opts.temperature
    if opts.top_k > 0:
        scores = apply_top_k(scores, opts.top_k)
    if opts.top_p < 1.0:
        scores = apply_top_p(scores, opts.top_p)
    return scores


def choose_tokens(
    logits: torch.Tensor,
    opts: SamplingOptions,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`logits [B, V]` -> next token ids `[B]`."""
    scores = process_logits(logits, opts, seen)
    if opts.greedy:
        return scores.argmax(-1)
    probs = scores.softmax(-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
