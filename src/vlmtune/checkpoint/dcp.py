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

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from vlmtune.errors import CheckpointError
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


def resolve(path: str) -> str:
    """A step directory, or a run/checkpoints directory whose `latest` names one."""
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    for base in (os.path.join(path, CHECKPOINTS), path):
        pointer = os.path.join(base, LATEST)
        if os.path.exists(pointer):
            with open(pointer) as f:
                return os.path.join(base, f.read().strip())
    raise CheckpointError(
        f"{path}: not a checkpoint (no meta.json) and no {CHECKPOINTS}/{LATEST} pointer in it"
    )


def latest(output_dir: str) -> str | None:
    try:
        return resolve(os.path.join(output_dir, CHECKPOINTS))
    except CheckpointError:
        return None


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
) -> str:
    """`dp_rank`/`dp_size` (default: rank / world size) say which data shard this rank reads, so a resume
    under another parallel layout with the same data parallelism restores the exact data position."""
    root = os.path.join(output_dir, CHECKPOINTS)
    name = step_name(step)
    tmp, final = os.path.join(root, f".tmp_{name}"), os.path.join(root, name)
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    state = {"model": get_model_state_dict(model)}
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
) -> dict:
    """Restore model (and optimizer, loader, RNG unless told not to); returns meta.json's contents.

    Weights and optimizer state reshard to any layout. The data position (and RNG) come back exactly when
    the data parallelism is the same as at save time (`dp_size`; the per-rank state of a rank that read the
    same data shard is used), otherwise the data order restarts at the saved epoch."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    if not no_load_optim and not meta["has_optim"]:
        raise CheckpointError(
            f"{path}: saved without optimizer state (checkpoint.no_save_optim); set checkpoint.no_load_optim=true"
        )
    if not no_load_rng and not meta["has_rng"]:
        raise CheckpointError(
            f"{path}: saved without RNG state (checkpoint.no_save_rng); set checkpoint.no_load_rng=true"
        )
    state = {"model": get_model_state_dict(model)}
    if not no_load_optim:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    if not no_load_optim:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    world = dist.get_world_size() if dist.is_initialized() else 1
    my_dp_rank = _rank() if dp_rank is None else dp_rank
    my_dp_size = world if dp_size is None else dp_size
    saved_dp_size = meta.get("dp_size", meta["world_size"])
    owners = meta.get("dp_rank_of_rank", list(range(meta["world_size"])))
    if saved_dp_size != my_dp_size or my_dp_rank not in owners:
        # Another data-parallel size: the loader maps the global position onto this rank (same data per
        # step); per-rank RNG streams do not map, so they start fresh.
        first = os.path.join(path, "rank_00000.pt")
        state = torch.load(first, weights_only=False) if os.path.exists(first) else {}
        if loader is not None and state.get("loader") is not None:
            loader.load_state_dict(state["loader"])
        if _rank() == 0:
            log.info(
                "%s: saved with %d data-parallel rank(s), resuming on %d: the data position continues; RNG "
                "states are not restored",
                path,
                saved_dp_size,
                my_dp_size,
            )
        return meta
    rank_file = os.path.join(path, f"rank_{owners.index(my_dp_rank):05d}.pt")
    local = torch.load(rank_file, weights_only=False) if os.path.exists(rank_file) else {}
    if loader is not None and local.get("loader") is not None:
        loader.load_state_dict(local["loader"])
    if not no_load_rng:
        set_rng_state(local["rng"])
    return meta
