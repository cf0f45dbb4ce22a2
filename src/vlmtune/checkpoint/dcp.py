"""Sharded training checkpoints with PyTorch DCP, published atomically.

Layout under `output_dir/checkpoints/`:
    step_00000010/            one checkpoint (DCP shards + the files below)
        .metadata, __*.distcp model (and optimizer) state, resharded on load to any world size
        meta.json             step, consumed samples, schedule, world size, what was saved, the run config
        rank_00000.pt         per rank: data-loader/sampler state, RNG states
        hf_assets/            config.json + tokenizer/processor files of the source model, so the
                              directory exports (and loads for inference) on its own
    latest                    text file naming the newest complete checkpoint

A checkpoint is written to `.tmp_step_*` and renamed only when every rank has finished; `latest` is then
replaced atomically, and only after that are checkpoints beyond `keep_last` removed. An interrupted write
leaves a `.tmp_*` directory that never becomes `latest` (and is cleared by the next save of that step).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from vlmtune.errors import CheckpointError, ranks_agree
from vlmtune.parallel.collectives import all_gather_object, barrier

from .hf import copy_assets

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
HF_ASSETS = "hf_assets"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_complete(step_dir: str) -> bool:
    """A published step directory: its meta.json and DCP `.metadata` exist (both are written last)."""
    return all(os.path.isfile(os.path.join(step_dir, f)) for f in ("meta.json", ".metadata"))


def resolve(path: str) -> str:
    """A complete step directory: `path` itself, or what the `latest` pointer of a run / checkpoints
    directory names. A step that is not complete, or a pointer naming one, is a CheckpointError."""
    if os.path.exists(os.path.join(path, "meta.json")):
        if not is_complete(path):
            raise CheckpointError(
                f"{path}: incomplete checkpoint (no DCP .metadata: its write was interrupted); use an "
                f"earlier step: {_complete_steps(os.path.dirname(os.path.abspath(path)))}"
            )
        return path
    for base in (os.path.join(path, CHECKPOINTS), path):
        pointer = os.path.join(base, LATEST)
        if os.path.isfile(pointer):
            try:
                with open(pointer, encoding="utf-8") as f:
                    name = f.read().strip()
            except (OSError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{pointer}: unreadable ({e})") from None
            step = os.path.join(base, name)
            if not name or os.path.basename(name) != name or not is_complete(step):
                raise CheckpointError(
                    f"{pointer} names {name!r}, which is not a complete checkpoint in {base} (missing, or its "
                    f"write was interrupted); write the name of a complete step into it "
                    f"({_complete_steps(base)}), or delete it to start from scratch"
                )
            return step
    raise CheckpointError(
        f"{path}: not a checkpoint (no meta.json) and no {CHECKPOINTS}/{LATEST} pointer in it"
    )


def _complete_steps(base: str) -> str:
    try:
        steps = sorted(
            d for d in os.listdir(base) if d.startswith("step_") and is_complete(os.path.join(base, d))
        )
    except OSError:
        steps = []
    return "complete ones: " + ", ".join(steps) if steps else "there is no complete one"


def latest(output_dir: str) -> str | None:
    """The step `output_dir/checkpoints/latest` names; None when there is no pointer (nothing saved yet).
    A pointer to an incomplete step is an error, never a silent fresh start."""
    if not os.path.isfile(os.path.join(output_dir, CHECKPOINTS, LATEST)):
        return None
    return resolve(os.path.join(output_dir, CHECKPOINTS))


def assets_dir(path: str) -> str:
    """A step's `hf_assets/`: the model's config.json and tokenizer files, saved with it."""
    assets = os.path.join(path, HF_ASSETS)
    if not os.path.isfile(os.path.join(assets, "config.json")):
        raise CheckpointError(
            f"{path}: no {HF_ASSETS}/config.json (the model config saved with the checkpoint); copy the base "
            f"model's config.json and tokenizer files into {assets}"
        )
    return assets


def read_meta(path: str) -> dict:
    """meta.json of a step directory, checked for the keys loading needs."""
    file = os.path.join(path, "meta.json")
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{file}: unreadable ({e}); the checkpoint is damaged: use another step"
        ) from None

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    ok = isinstance(meta, dict) and count(meta.get("step")) and count(meta.get("world_size"))
    ok = ok and count(meta.get("dp_size", 0))
    ranks = meta.get("dp_rank_of_rank", []) if ok else None
    if not ok or not isinstance(ranks, list) or not all(count(r) for r in ranks):
        raise CheckpointError(
            f"{file}: not a vlmtune checkpoint's meta.json (needs 'step' and 'world_size'; 'dp_size' and "
            "'dp_rank_of_rank' when present must be counts); the checkpoint is damaged: use another step"
        )
    return meta


MODEL_PREFIX = "model."  # the trainer saves {"model": model_state_dict, ...}: DCP keys are "model.<name>"


def read_dcp_metadata(path: str):
    """The DCP `.metadata` of a step directory (what every tensor is: name, shape, dtype)."""
    try:
        return dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # missing, truncated or not a DCP file (pickle errors of many kinds)
        raise CheckpointError(
            f"{path}: unreadable DCP metadata ({type(e).__name__}: {e}); the checkpoint is damaged"
        ) from None


def model_tensors(path: str) -> tuple[dict, Callable[[str], torch.Tensor]]:
    """A step's model tensors, read one at a time in one process: ({name: its DCP metadata (size, dtype)},
    get(name) -> the whole tensor)."""
    meta = read_dcp_metadata(path).state_dict_metadata
    n = len(MODEL_PREFIX)
    props = {k[n:]: v for k, v in meta.items() if k.startswith(MODEL_PREFIX) and hasattr(v, "size")}

    def get(name: str) -> torch.Tensor:
        key = MODEL_PREFIX + name
        out = {key: torch.empty(props[name].size, dtype=props[name].properties.dtype)}
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="torch.distributed is disabled"
            )  # one process on purpose
            dcp_load(out, path, no_dist=True)
        return out[key]

    return props, get


def dcp_load(state: dict, path: str, **kwargs) -> None:
    """`dcp.load`, with its failures (reported on every rank) as one CheckpointError line each."""
    try:
        dcp.load(state, checkpoint_id=path, **kwargs)
    except CheckpointException as e:
        first = [f"rank {r}: {type(exc).__name__}: {exc}" for r, (exc, _) in sorted(e.failures.items())]
        raise CheckpointError(
            f"{path}: cannot load ({'; '.join(first)[:800]}); the checkpoint is damaged or belongs to "
            "another model"
        ) from None


def save(
    output_dir: str,
    step: int,
    *,
    model,
    optimizer,
    loader,
    meta: dict,
    source_dir: str,
    no_save_optim: bool,
    no_save_rng: bool,
    keep_last: int,
    dp_rank: int | None = None,
    dp_size: int | None = None,
    trainable_only: bool = False,
) -> str:
    """`dp_rank`/`dp_size` (default: rank / world size) say which data shard this rank reads, so a resume
    under another parallel layout with the same data parallelism restores the exact data position.
    `trainable_only` (LoRA) leaves the frozen weights out: they are the HF checkpoint's."""
    root = os.path.join(output_dir, CHECKPOINTS)
    name = step_name(step)
    tmp, final = os.path.join(root, f".tmp_{name}"), os.path.join(root, name)
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    state = {"model": get_model_state_dict(model, options=_options(trainable_only))}
    if not no_save_optim:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=tmp)
    local = {"loader": loader.state_dict() if loader is not None else None}
    if not no_save_rng:
        local["rng"] = rng_state()
    torch.save(local, os.path.join(tmp, f"rank_{rank:05d}.pt"))
    world = dist.get_world_size() if dist.is_initialized() else 1
    dp_ranks = all_gather_object(rank if dp_rank is None else dp_rank)
    if rank == 0:
        meta = {
            **meta,
            "step": step,
            "world_size": world,
            "dp_size": world if dp_size is None else dp_size,
            "dp_rank_of_rank": dp_ranks,
            "has_optim": not no_save_optim,
            "has_rng": not no_save_rng,
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        os.makedirs(os.path.join(tmp, HF_ASSETS))
        copy_assets(source_dir, os.path.join(tmp, HF_ASSETS), with_config=True)
    barrier()  # every rank's shards are on disk
    if rank == 0:
        publish(tmp, root, name, keep_last)
    barrier()
    return final


def _options(trainable_only: bool) -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def publish(tmp: str, root: str, name: str, keep_last: int | None = None) -> str:
    """Make the finished checkpoint `tmp` the step directory `root/name` and point `latest` at it, each by an
    atomic rename (a crash leaves either the old or the new `latest`, never a half-written one); then remove
    checkpoints beyond `keep_last`. Used by training saves and by `vlmtune convert`."""
    final = os.path.join(root, name)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = os.path.join(root, LATEST)
    with open(pointer + ".tmp", "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer + ".tmp", pointer)
    if keep_last is not None:
        prune(root, keep_last)
    return final


def prune(root: str, keep_last: int) -> None:
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for d in steps[:-keep_last]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def load(
    path: str,
    *,
    model,
    optimizer,
    loader,
    no_load_optim: bool,
    no_load_rng: bool,
    dp_rank: int | None = None,
    dp_size: int | None = None,
    trainable_only: bool = False,
) -> dict:
    """Restore model (and optimizer, loader, RNG unless told not to); returns meta.json's contents.

    Weights and optimizer state reshard to any layout. The data position (and RNG) come back exactly when
    the data parallelism is the same as at save time (`dp_size`; the per-rank state of a rank that read the
    same data shard is used), otherwise the data order restarts at the saved epoch. Every rank checks the
    files it will read (meta.json, its per-rank state, the loader position) before the first collective, and
    the ranks agree, so a problem on one rank stops all of them."""
    with ranks_agree():
        meta = read_meta(path)
        _check_flags(path, meta, no_load_optim, no_load_rng)
        local, same_dp = _local_state(path, meta, dp_rank, dp_size)
        if loader is not None and local.get("loader") is not None:
            try:
                loader.load_state_dict(local["loader"])
            except (KeyError, TypeError, ValueError) as e:
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"{path}: damaged data-loader state ({e})") from None
    state = {"model": get_model_state_dict(model, options=_options(trainable_only))}
    if not no_load_optim:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp_load(state, path)
    set_model_state_dict(model, state["model"], options=_options(trainable_only))
    if not no_load_optim:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    if not same_dp:
        if _rank() == 0:
            log.info(
                "%s: saved with %d data-parallel rank(s), resuming on %d: the data position continues; RNG "
                "states are not restored",
                path,
                meta.get("dp_size", meta["world_size"]),
                dp_size or (dist.get_world_size() if dist.is_initialized() else 1),
            )
    elif not no_load_rng:
        set_rng_state(local["rng"])
    return meta


def _check_flags(path: str, meta: dict, no_load_optim: bool, no_load_rng: bool) -> None:
    if not no_load_optim and not meta.get("has_optim"):
        raise CheckpointError(
            f"{path}: saved without optimizer state (checkpoint.no_save_optim); set checkpoint.no_load_optim=true"
        )
    if not no_load_rng and not meta.get("has_rng"):
        raise CheckpointError(
            f"{path}: saved without RNG state (checkpoint.no_save_rng); set checkpoint.no_load_rng=true"
        )


def _local_state(path: str, meta: dict, dp_rank: int | None, dp_size: int | None) -> tuple[dict, bool]:
    """(this rank's per-rank state, whether the data parallelism is the one it was saved with). A checkpoint
    the trainer saved has a state file per rank; a converted one (`vlmtune convert`) has none."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    my_dp_rank = _rank() if dp_rank is None else dp_rank
    my_dp_size = world if dp_size is None else dp_size
    saved_dp_size = meta.get("dp_size", meta["world_size"])
    owners = meta.get("dp_rank_of_rank", list(range(meta["world_size"])))
    same_dp = saved_dp_size == my_dp_size and my_dp_rank in owners
    # Another data-parallel size: the loader maps the global position onto this rank (same data per step);
    # per-rank RNG streams do not map, so they start fresh.
    owner = owners.index(my_dp_rank) if same_dp else 0
    file = os.path.join(path, f"rank_{owner:05d}.pt")
    if "dp_rank_of_rank" not in meta:
        return {}, same_dp
    if not os.path.isfile(file):
        raise CheckpointError(
            f"{file}: missing (the data position and RNG state of rank {owner}); the checkpoint is incomplete: "
            "resume from another step"
        )
    try:
        local = torch.load(file, weights_only=False)
    except Exception as e:  # truncated or not a torch file: many kinds
        raise CheckpointError(
            f"{file}: unreadable ({type(e).__name__}: {e}); the checkpoint is damaged"
        ) from None
    if (
        not isinstance(local, dict)
        or "loader" not in local
        or (same_dp and meta.get("has_rng") and "rng" not in local)
    ):
        raise CheckpointError(
            f"{file}: damaged per-rank state (needs 'loader' and 'rng'); resume from another step"
        )
    return local, same_dp
