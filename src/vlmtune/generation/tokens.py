"""The token ids generation needs from a checkpoint's tokenizer files: where answers end, what pads a batch."""

from __future__ import annotations

import json
import os

from vlmtune.errors import CheckpointError


def stop_token_ids(tokenizer, model_dir: str | None = None) -> list[int]:
    """Tokens that end an answer: the tokenizer's eos, `<|im_end|>`, and `generation_config.json`'s eos."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    file = os.path.join(model_dir, "generation_config.json") if model_dir else None
    if file and os.path.isfile(file):
        try:
            with open(file, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id")
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(
                f"{file}: unreadable ({e}); copy it again from the base checkpoint"
            ) from None
        eos = [eos] if isinstance(eos, int) else (eos or [])
        if not isinstance(eos, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
            raise CheckpointError(f"{file}: eos_token_id must be a token id or a list of them, got {eos!r}")
        ids.update(eos)
    if not ids:
        raise CheckpointError(
            "the tokenizer defines no eos token and <|im_end|> is unknown; cannot tell where answers end"
        )
    return sorted(ids)


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)
