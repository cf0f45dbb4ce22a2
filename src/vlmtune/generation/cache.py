"""Key/value cache for incremental decoding.

Implements the model's cache protocol: `.seq_len` is the number of positions cached before the current
forward, `.update(layer_idx, k, v)` stores the new `[B, Hkv, L, D]` keys/values of one layer and returns all
of them so far. Buffers are allocated once per layer at the first update (the total length is known up
front), so decode steps write in place instead of concatenating a growing tensor every step. A chat keeps
its cache from turn to turn: `truncate` drops what the next turn renders differently, `reserve` grows it.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, max_len: int):
        if max_len <= 0:
            raise ValueError(f"KVCache max_len must be positive, got {max_len}")
        self.max_len = max_len
        self.seq_len = 0
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.seq_len, self.seq_len + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {end} positions requested, capacity {self.max_len}")
        if layer_idx not in self._k:
            b, h, _, d = k.shape
            self._k[layer_idx] = k.new_empty(b, h, self.max_len, d)
            self._v[layer_idx] = v.new_empty(b, h, self.max_len, v.shape[3])
        kb, vb = self._k[layer_idx], self._v[layer_idx]
        kb[:, :, start:end] = k
        vb[:, :, start:end] = v
        return kb[:, :, :end], vb[:, :, :end]

    def advance(self, n: int) -> None:
        """Commit the `n` positions every layer has just written (call once after each forward)."""
        if self.seq_len + n > self.max_len:
            raise ValueError(f"KVCache overflow: {self.seq_len + n} positions, capacity {self.max_len}")
        self.seq_len += n

    def reserve(self, max_len: int) -> None:
        """Room for `max_len` positions (buffers already allocated grow, keeping what they hold)."""
        if max_len <= self.max_len:
            return
        for store in (self._k, self._v):
            for i, buf in store.items():
                grown = buf.new_empty(*buf.shape[:2], max_len, buf.shape[3])
                grown[:, :, : self.seq_len] = buf[:, :, : self.seq_len]
                store[i] = grown
        self.max_len = max_len

    def truncate(self, n: int) -> None:
        """Keep the first `n` cached positions (the next forward writes after them)."""
        if not 0 <= n <= self.seq_len:
            raise ValueError(f"KVCache.truncate({n}): holds {self.seq_len} positions")
        self.seq_len = n

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (in that order), e.g. to drop finished sequences."""
        for store in (self._k, self._v):
            for i, buf in store.items():
                store[i] = buf.index_select(0, index.to(buf.device))
