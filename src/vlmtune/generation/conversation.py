"""A conversation's KV cache kept from turn to turn: each turn prefills only what the cache does not hold.

Every turn the whole conversation is encoded again (the chat template decides how earlier turns render), and
its token ids are compared with the ids in the cache: the common prefix stays cached, the rest (the new user
turn, and whatever of the last answer renders differently from the tokens that were generated) is
prefilled. A cut never falls inside an image or video: a media item is in the cache whole or prefilled
whole, with its pixels.
"""

from __future__ import annotations

import torch

from .cache import KVCache


class ConversationCache:
    """The cache and the ids it holds. `split(encoded)` -> what to prefill; `record(...)` after the turn."""

    def __init__(self, *, image_token_id: int, video_token_id: int):
        self.image_token_id, self.video_token_id = image_token_id, video_token_id
        self.reset()

    def reset(self) -> None:
        self.cache = KVCache(1)
        self.ids: list[int] = []

    def split(self, encoded: dict) -> tuple[dict, torch.Tensor]:
        """(the new part of `encoded` (ids, positions and media not in the cache), the cached ids); the cache
        is cut back to the part it shares with `encoded`."""
        ids = encoded["input_ids"].reshape(-1)
        full = ids.tolist()
        keep = 0
        for a, b in zip(self.ids, full[:-1]):  # at least one token is prefilled: its logits start the answer
            if a != b:
                break
            keep += 1
        spans = self._media_spans(ids, encoded)
        for _, start, end in spans:
            if start <= keep < end:  # inside a vision block: it is prefilled whole
                keep = start
        self.cache.truncate(keep)
        batch = {"input_ids": ids[keep:], "position_ids": encoded["position_ids"].reshape(3, -1)[:, keep:]}
        batch.update(self._new_media(encoded, [(k, s) for k, s, _ in spans], keep))
        self.ids = full[:keep]
        return batch, ids[:keep]

    def record(self, fed: list[int]) -> None:
        """After a turn: the prompt's new part and the generated tokens that went through the model (all but
        the last chosen one) are in the cache now."""
        self.ids += fed
        if len(self.ids) != self.cache.seq_len:
            raise AssertionError(
                f"conversation cache holds {self.cache.seq_len} positions, {len(self.ids)} ids"
            )

    def _media_spans(self, ids: torch.Tensor, encoded: dict) -> list[tuple[str, int, int]]:
        """(kind, first, end) token span of every image and video, in order: from its `<|vision_start|>` (the
        token before its first pad) to its last pad; a video's frame-pairs make one span."""
        spans = []
        for kind, token, key in (
            ("image", self.image_token_id, "image_grid_thw"),
            ("video", self.video_token_id, "video_grid_thw"),
        ):
            grids = encoded.get(key)
            if grids is None:
                continue
            pads = (ids == token).nonzero().flatten().tolist()
            runs = _runs(pads)
            for t, _, _ in grids.tolist():
                blocks = 1 if kind == "image" else t  # a video: one block per frame-pair
                mine, runs = runs[:blocks], runs[blocks:]
                spans.append((kind, mine[0][0] - 1, mine[-1][1]))
        return sorted(spans, key=lambda s: s[1])

    def _new_media(self, encoded: dict, starts: list[tuple[str, int]], keep: int) -> dict:
        out = {}
        for kind, pixels_key, grid_key in (
            ("image", "pixel_values", "image_grid_thw"),
            ("video", "pixel_values_videos", "video_grid_thw"),
        ):
            grids = encoded.get(grid_key)
            if grids is None:
                continue
            cached = sum(1 for k, s in starts if k == kind and s < keep)
            if cached < len(grids):
                patches = int(grids[:cached].prod(dim=1).sum())
                out[pixels_key] = encoded[pixels_key][patches:]
                out[grid_key] = grids[cached:]
        return out


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Consecutive positions -> (first, one past the last) runs."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs
