"""Run a function on N gloo ranks (CPU processes on 127.0.0.1) and collect each rank's return value."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback

import torch.multiprocessing as mp

from vlmtune.parallel.mesh import release_process_groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # report the rank's traceback to the test
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    dist.destroy_process_group()
    release_process_groups()  # gloo's threads stop before interpreter shutdown (see its docstring)


def run_ranks(fn, world: int, *args) -> list:
    """`fn(rank, world, *args)` on `world` processes; returns the list of results (raises on any failure)."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _worker, args=(world, free_port(), out, fn, args), nprocs=world, start_method="spawn"
        )
        results, errors = [], []
        for r in range(world):
            with open(os.path.join(out, f"{r}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            (results if status == "ok" else errors).append(value if status == "ok" else f"rank {r}:\n{value}")
        if errors:
            raise AssertionError("\n".join(errors))
        return results
