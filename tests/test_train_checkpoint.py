"""DCP checkpoints through real training runs: SIGKILL and resume reproduces the losses exactly, SIGTERM
saves and exits, interrupted writes never become `latest`, keep_last, and the four no-load/no-save flags."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml

from test_train_utils import make_run_checkpoint
from test_train_utils import run_config as shared_run_config
from vlmtune.checkpoint import dcp as checkpoint
from vlmtune.checkpoint.export import load_model_from_checkpoint
from vlmtune.demo import make_dataset
from vlmtune.errors import CheckpointError
from vlmtune.train.config import from_dict
from vlmtune.train.metrics import read_metrics
from vlmtune.train.optim import build_optimizer
from vlmtune.train.trainer import train

STEPS = 6


@pytest.fixture(scope="module")
def run_ckpt(tmp_path_factory):
    return make_run_checkpoint(str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("vqa"))
    make_dataset(d, n_train=40, n_eval=2, seed=1)
    return d


def run_config(out, ckpt, data_dir, **sections) -> dict:
    return shared_run_config(out, ckpt, data_dir, steps=STEPS, **sections)


def losses(out) -> list[tuple]:
    return [
        (r["step"], r["loss"], r["grad_norm"], r["consumed_samples"])
        for r in read_metrics(str(out))
        if "loss" in r
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, run_ckpt, dataset):
    out = tmp_path_factory.mktemp("reference")
    summary = train(from_dict(run_config(out, run_ckpt, dataset)))
    assert summary["step"] == STEPS
    return out


def launch(out, raw) -> subprocess.Popen:
    path = os.path.join(out, "config.yaml")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    # Same thread count as the in-process runs: float reductions then happen in the same order.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-m", "vlmtune.cli", "train", path], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def wait_for_step(out, proc, step: int) -> None:
    pointer = os.path.join(out, "checkpoints", "latest")
    deadline = time.time() + 300
    while time.time() < deadline:
        if os.path.exists(pointer) and int(open(pointer).read().split("_")[1]) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def test_keep_last_and_latest(reference):
    root = os.path.join(reference, "checkpoints")
    assert sorted(d for d in os.listdir(root) if d.startswith("step_")) == ["step_00000005", "step_00000006"]
    assert checkpoint.latest(str(reference)).endswith("step_00000006")
    assert [s for s, *_ in losses(reference)] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_losses(reference, run_ckpt, dataset, tmp_path):
    out = str(tmp_path / "killed")
    raw = run_config(out, run_ckpt, dataset)
    proc = launch(out, raw)
    wait_for_step(out, proc, 2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = int(open(os.path.join(out, "checkpoints", "latest")).read().split("_")[1])
    assert killed_at < STEPS
    summary = train(from_dict(raw))  # the same config again: auto-resume from latest
    assert summary["steps_run"] == STEPS - killed_at
    assert losses(out) == losses(reference)  # bitwise: loss, grad norm, consumed samples


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(run_ckpt, dataset, tmp_path):
    out = str(tmp_path / "term")
    proc = launch(
        out,
        run_config(out, run_ckpt, dataset, train={"train_iters": 500}, checkpoint={"save_interval": 0}),
    )
    while not os.path.exists(os.path.join(out, "metrics.jsonl")):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "SIGTERM: saved step" in output
    last = losses(out)[-1][0]
    assert checkpoint.latest(out).endswith(f"step_{last:08d}") and last < 500


def test_interrupted_write_never_becomes_latest(reference, run_ckpt, dataset, tmp_path):
    import shutil

    out = tmp_path / "partial"
    shutil.copytree(reference, out)
    root = out / "checkpoints"
    # A save of step 7 that died half-way: shards without metadata, no rename, no pointer update.
    partial = root / ".tmp_step_00000007"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\0" * 100)
    assert checkpoint.latest(str(out)).endswith("step_00000006")
    summary = train(from_dict(run_config(out, run_ckpt, dataset, train={"train_iters": 7})))
    assert summary["steps_run"] == 1 and checkpoint.latest(str(out)).endswith("step_00000007")
    assert not partial.exists()  # the retry of step 7 replaced the partial write
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        checkpoint.resolve(str(tmp_path))


def test_no_save_flags_then_no_load_flags(run_ckpt, dataset, tmp_path):
    out = tmp_path / "flags"
    raw = run_config(out, run_ckpt, dataset, train={"train_iters": 2},
                     checkpoint={"no_save_optim": True, "no_save_rng": True})  # fmt: skip
    train(from_dict(raw))
    path = checkpoint.latest(str(out))
    meta = json.load(open(os.path.join(path, "meta.json")))
    assert meta["has_optim"] is False and meta["has_rng"] is False
    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    assert keys and not any(k.startswith("optim") for k in keys)
    assert "rng" not in torch.load(os.path.join(path, "rank_00000.pt"), weights_only=False)
    raw["train"]["train_iters"] = 3
    with pytest.raises(CheckpointError, match="set checkpoint.no_load_optim=true"):
        train(from_dict(raw))
    raw["checkpoint"].update(no_load_optim=True)
    with pytest.raises(CheckpointError, match="set checkpoint.no_load_rng=true"):
        train(from_dict(raw))
    raw["checkpoint"].update(no_load_rng=True)
    assert train(from_dict(raw))["steps_run"] == 1


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_no_load_optim_and_rng_on_a_full_checkpoint(reference):
    path = checkpoint.latest(str(reference))
    model = load_model_from_checkpoint(path)
    cfg = from_dict(json.load(open(os.path.join(path, "meta.json")))["config"], check_paths=False)
    saved_rng = torch.load(os.path.join(path, "rank_00000.pt"), weights_only=False)["rng"]["torch"]

    opt = build_optimizer(model, cfg)
    torch.manual_seed(1234)
    mine = torch.get_rng_state()
    checkpoint.load(path, model=model, optimizer=opt, loader=None, no_load_optim=True, no_load_rng=True)
    assert not opt.state and torch.equal(torch.get_rng_state(), mine)

    opt = build_optimizer(model, cfg)
    checkpoint.load(path, model=model, optimizer=opt, loader=None, no_load_optim=False, no_load_rng=False)
    steps = {float(s["step"]) for s in opt.state.values()}
    assert steps == {float(STEPS)} and torch.equal(torch.get_rng_state(), saved_rng)


@pytest.mark.slow
def test_torchrun_two_ranks_then_resume_on_one(run_ckpt, dataset, tmp_path):
    out = str(tmp_path / "two_ranks")
    raw = run_config(out, run_ckpt, dataset, train={"train_iters": 2})
    os.makedirs(out)
    path = os.path.join(out, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "vlmtune.cli", "train", path]  # fmt: skip
    res = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    ckpt = checkpoint.latest(out)
    assert json.load(open(os.path.join(ckpt, "meta.json")))["world_size"] == 2
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("rank_")) == ["rank_00000.pt", "rank_00001.pt"]
    assert [s for s, *_ in losses(out)] == [1, 2]
    raw["train"]["train_iters"] = 3  # DCP reshards the 2-rank checkpoint onto one process
    assert train(from_dict(raw))["steps_run"] == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
