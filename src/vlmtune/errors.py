"""The errors vlmtune raises on purpose: bad configs, data, checkpoints and parallel layouts.

Every command catches `VlmtuneError`, prints `error: <message>` and exits with status 2; any other
exception is a bug and keeps its traceback. Messages say what is wrong, where, and what to do.
Every class pickles (DataLoader workers raise them in another process, ranks exchange them).
`ranks_agree` makes a problem one rank finds stop every rank with the same message.
"""

from __future__ import annotations

from contextlib import contextmanager


class VlmtuneError(Exception):
    """Base class: a problem with the user's input, reported as `error: <message>` (exit 2)."""


class ConfigError(VlmtuneError, ValueError):
    """A training config, CLI argument or model config.json that cannot run; the message names the key."""


class ParallelError(ConfigError):
    """A parallel layout that cannot work for this model or world size; the message says what would."""


class DataError(VlmtuneError, ValueError):
    """A dataset that cannot be used as a whole (missing file, nothing left to train on, ...)."""


class CheckpointError(VlmtuneError, ValueError):
    """A model or training checkpoint directory that is missing, incomplete or does not fit the model."""


# ---------------------------------------------------------------------------------------------- ranks
# Under torchrun a problem found by one rank must stop every rank: the others would otherwise wait in their
# next collective for ever. Ranks check their own inputs before a collective and then agree.

WORLD, NODE = "world", "node"  # values of `VlmtuneError.every_rank`: which ranks hold the same error


@contextmanager
def ranks_agree():
    """Run the block on every rank, then agree: if it raised on any rank, every rank raises (the lowest
    failing rank's error, so the message is the same everywhere; rank 0 prints it). Every rank must enter
    the block, and the block must do no collective after the point where it can fail. Without a process
    group of several ranks the block runs as it is."""
    error = None
    try:
        yield
    except Exception as e:
        error = e
    raise_on_all_ranks(error)


def raise_on_all_ranks(error: BaseException | None) -> None:
    """A collective over all ranks: returns when no rank brings an error, else raises on every rank."""
    import torch.distributed as dist  # third-party and heavy: only when ranks are involved

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        if error is not None:
            raise error
        return
    mine = None if error is None else (dist.get_rank(), _portable(error))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    failures = [f for f in everyone if f is not None]
    if not failures:
        return
    rank, first = failures[0]
    if error is not None and not isinstance(error, VlmtuneError):
        raise error  # a bug on this rank: keep its traceback (rank 0 prints the agreed message)
    if rank != dist.get_rank() or error is None:
        error = first
    error.every_rank = WORLD
    if rank:
        error.args = (f"rank {rank}: {error}",)
    raise error


def _portable(error: BaseException) -> VlmtuneError:
    """The error as it travels to the other ranks: a VlmtuneError as it is (they all pickle), a bug as a
    message pointing at its rank's traceback."""
    if isinstance(error, VlmtuneError):
        return error
    return VlmtuneError(f"{type(error).__name__}: {error} (a bug: see that rank's traceback)")


@contextmanager
def before_process_group():
    """Errors raised in the block come from files every rank reads alike before the process group exists:
    under torchrun each node's local rank 0 prints them and the other ranks stay quiet."""
    try:
        yield
    except VlmtuneError as e:
        e.every_rank = getattr(e, "every_rank", None) or NODE
        raise
