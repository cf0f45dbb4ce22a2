"""`vlmtune train` under tensor and expert parallelism, layout changes on resume, and a two-"node" launch.

Every run trains the same data (data parallelism is the same in the runs compared), so the logged losses of
a parallel run equal the one-process run, and a checkpoint saved under one layout continues under another
with the losses of the uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import yaml

from test_train_utils import run_config
from vlmtune.demo import make_dataset
from vlmtune.train.config import from_dict
from vlmtune.train.metrics import read_metrics
from vlmtune.train.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("vqa"))
    make_dataset(d, n_train=40, n_eval=2, seed=1)
    return d


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    """Four attention heads everywhere, so tp=2 and tp=4 both divide them."""
    from vlmtune.testing import make_tiny_checkpoint

    d = str(tmp_path_factory.mktemp("dense"))
    make_tiny_checkpoint(
        d, seed=0, text_hidden=32, text_layers=2, heads=4, kv_heads=4, head_dim=16,
        vision_hidden=32, vision_depth=2, vision_heads=4, deepstack=(0,),
    )  # fmt: skip
    return d


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    from vlmtune.testing import make_tiny_checkpoint

    d = str(tmp_path_factory.mktemp("moe"))
    make_tiny_checkpoint(
        d, seed=0, text_hidden=32, text_layers=2, heads=2, kv_heads=2, head_dim=16, vision_hidden=32,
        vision_depth=2, deepstack=(0,), moe=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    )  # fmt: skip
    return d


def config(out, ckpt, data_dir, **sections) -> dict:
    return run_config(out, ckpt, data_dir, steps=STEPS, keep_last=1, **sections)


def write(out, raw) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def torchrun(out, raw, nproc: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "vlmtune.cli", "train", write(out, raw)]  # fmt: skip
    res = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(out)) if "loss" in r}


def assert_close(got: dict, want: dict, steps) -> None:
    for s in steps:
        assert abs(got[s] - want[s]) <= 1e-5 * abs(want[s]), (s, got, want)


@pytest.fixture(scope="module")
def dense_reference(tmp_path_factory, dense_ckpt, dataset):
    out = tmp_path_factory.mktemp("dense_ref")
    train(from_dict(config(out, dense_ckpt, dataset)))
    return losses(out)


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory, moe_ckpt, dataset):
    out = tmp_path_factory.mktemp("moe_ref")
    train(from_dict(config(out, moe_ckpt, dataset)))
    return losses(out)


def fsdp2_checkpoint(tmp_path, ckpt, dataset, reference) -> str:
    """Steps 1-2 under FSDP2 on two ranks: the same data per step as one process, the same losses."""
    out = tmp_path / "fsdp2"
    torchrun(out, config(out, ckpt, dataset, train={"train_iters": 2}), 2)
    assert_close(losses(out), reference, [1, 2])
    return str(out)


def resume_under(tmp_path, name, saved, ckpt, dataset, **sections) -> str:
    out = tmp_path / name
    shutil.copytree(saved, out)
    torchrun(out, config(out, ckpt, dataset, **sections), 2)
    return out


@pytest.mark.slow
def test_fsdp2_checkpoint_continues_under_tp2_and_pp2(tmp_path, dense_ckpt, dataset, dense_reference):
    """Saved under FSDP2 x 2, resumed under TP2 and under PP2 (1F1B, each stage loading only its tensors):
    steps 3-4 equal the uninterrupted one-process run. The PP2 run's HF export streams from its checkpoint."""
    saved = fsdp2_checkpoint(tmp_path, dense_ckpt, dataset, dense_reference)
    tp = resume_under(tmp_path, "tp2", saved, dense_ckpt, dataset, parallel={"tp": 2})
    assert_close(losses(tp), dense_reference, [1, 2, 3, 4])
    pp = resume_under(
        tmp_path, "pp2", saved, dense_ckpt, dataset,
        parallel={"pp": 2, "llm_pp_layers": [1, 1]}, checkpoint={"save_hf": True},
    )  # fmt: skip
    assert_close(losses(pp), dense_reference, [1, 2, 3, 4])
    assert (pp / "hf" / "model.safetensors.index.json").exists()


@pytest.mark.slow
def test_fsdp2_checkpoint_continues_under_ep2(tmp_path, moe_ckpt, dataset, moe_reference):
    saved = fsdp2_checkpoint(tmp_path, moe_ckpt, dataset, moe_reference)
    ep = resume_under(tmp_path, "ep2", saved, moe_ckpt, dataset, parallel={"ep": 2})
    assert_close(losses(ep), moe_reference, [1, 2, 3, 4])


@pytest.mark.slow
def test_tp2_x_ep2_moe_equals_one_process(tmp_path, moe_ckpt, dataset, moe_reference):
    """The 30B-A3B recipe in small: 4 ranks, tensor parallel 2 x (FSDP 2 with experts over ep 2)."""
    out = tmp_path / "tp2_ep2"
    torchrun(out, config(out, moe_ckpt, dataset, train={"train_iters": 2}, parallel={"tp": 2, "ep": 2}), 4)
    assert_close(losses(out), moe_reference, [1, 2])


@pytest.mark.slow
def test_hsdp_equals_one_process(tmp_path, dense_ckpt, dataset, dense_reference):
    """dp_replicate=2 x dp_shard=1 (HSDP): two data shards, the same step data as one process."""
    out = tmp_path / "hsdp"
    torchrun(out, config(out, dense_ckpt, dataset, train={"train_iters": 2}, parallel={"dp_replicate": 2}), 2)
    assert_close(losses(out), dense_reference, [1, 2])


@pytest.mark.slow
def test_two_nodes_on_loopback_match_one_process(tmp_path, dense_ckpt, dataset, dense_reference):
    """Two torchrun 'nodes' of two processes each, started by examples/launch.sh (tp=4, one data shard)."""
    out = tmp_path / "two_nodes"
    path = write(out, config(out, dense_ckpt, dataset, train={"train_iters": 3}, parallel={"tp": 4}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NNODES": "2", "NPUS_PER_NODE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    nodes = [
        subprocess.Popen(["bash", os.path.join(ROOT, "examples", "launch.sh"), path],
                         env={**env, "NODE_RANK": str(n)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for n in range(2)
    ]  # fmt: skip
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), "\n".join(log[-3000:] for log in logs)
    assert_close(losses(out), dense_reference, [1, 2, 3])


def test_pipeline_limits_are_clear_errors(dense_ckpt):
    from vlmtune.errors import ParallelError
    from vlmtune.models.qwen3_vl import load_config
    from vlmtune.parallel.layout import ParallelConfig, resolve

    with pytest.raises(ParallelError, match="needs parallel.llm_pp_layers, e.g. \\[1, 1\\]"):
        resolve(ParallelConfig(pp=2), 2, load_config(dense_ckpt))
