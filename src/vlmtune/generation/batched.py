"""Many prompts at once: length-sorted, left-padded batches (rows of similar length waste little on
padding), on one process or on ranks that must step together.

Ranks of a sharded model (FSDP gathers weights in every forward, tensor parallelism reduces in every layer)
each generate their own prompts, but every rank must run the same number of forwards: `in_lockstep` runs
one forward per round on every rank, the rank's own or an idle one once its rows have stopped, until no
rank has a row left.
"""

from __future__ import annotations

from collections.abc import Callable

from .generate import Decoding, Step, generate, left_pad


def length_batches(prompts: list[dict], batch_size: int) -> list[list[int]]:
    """Prompt indices, longest first (ties in the given order), cut into batches of `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: (-int(prompts[i]["input_ids"].shape[-1]), i))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def generate_batched(model, prompts: list[dict], *, batch_size: int, pad_token_id: int, **options) -> list:
    """New token ids per prompt (in the given order) from length-sorted, left-padded batches; `options` as
    for `generate` (`max_new_tokens`, `eos_token_ids`, `sampling`, ...)."""
    out: list = [None] * len(prompts)
    for index in length_batches(prompts, batch_size):
        tokens = generate(model, left_pad([prompts[i] for i in index], pad_token_id), **options)
        for i, t in zip(index, tokens):
            out[i] = t
    return out


def in_lockstep(
    model, prompts: list[dict], *, batch_size: int, pad_token_id: int, any_rank: Callable[[bool], bool],
    idle: Callable[[bool], None], forward=None, max_new_tokens: int, eos_token_ids=(), **options,
) -> list:  # fmt: skip
    """`generate_batched` on ranks that step together. `any_rank(flag)` is a collective: whether `flag` is
    true on some rank; `idle(prefill)` runs one forward that does no work but gathers what a real one
    gathers (a prefill's also runs the vision tower); `forward` replaces `model(...)` (see `Decoding`)."""
    stop = set(int(t) for t in eos_token_ids)
    batches = length_batches(prompts, batch_size)
    out: list = [None] * len(prompts)
    k = 0
    while any_rank(k < len(batches)):
        decoding, index = None, batches[k] if k < len(batches) else []
        if index:
            batch = left_pad([prompts[i] for i in index], pad_token_id)
            decoding = Decoding(
                model, batch, max_new_tokens=max_new_tokens, eos_token_ids=stop, forward=forward, **options
            )
            for i in index:
                out[i] = []
            _collect(out, index, decoding.prefill(), stop)
        else:
            idle(True)
        while any_rank(active := decoding is not None and decoding.more()):
            if active:
                _collect(out, index, decoding.decode(), stop)
            else:
                idle(False)
        k += 1
    return out


def _collect(out: list, index: list[int], step: Step, stop: set[int]) -> None:
    for row, token in zip(step.rows.tolist(), step.tokens.tolist()):
        if token not in stop:
            out[index[row]].append(token)
