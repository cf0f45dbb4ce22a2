"""Tensors given to a collective live on the group's device, and nothing in a training step is created
without the compute device: the CPU test that would have caught vlmtune's first-step crash on NCCL.

The mechanism (docs/gpu.md): on 2 gloo ranks the step runs under `torch.set_default_device("meta")`. The
compute device is the CPU, so every tensor the step code creates *with* a device is real, and every tensor
created *without* one (`torch.tensor(x)`, `torch.zeros(n)`) lands on meta: mixing it with a model tensor
raises "Tensor on device meta is not on the expected device cpu", giving it to a collective raises in
`parallel/collectives.py`, and reading it (`.item()`) raises too. On a GPU those same tensors would have
been CPU tensors mixed with CUDA ones or handed to NCCL. The step must give exactly the losses of a normal
run; the negative controls show that the two bugs of the issue (a CPU scalar stacked with CUDA norms, a
host-built tensor given to NCCL) fail here.
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_ranks
from test_train_utils import pack, random_sample, small_vocab_model
from vlmtune import save_pretrained
from vlmtune.parallel import collectives as coll
from vlmtune.parallel.layout import ParallelConfig
from vlmtune.train.build import build_sharded_model
from vlmtune.train.config import TrainConfig
from vlmtune.train.optim import build_optimizer
from vlmtune.train.step import DataParallelStep, TrainModule, clip_and_norm, finish_step

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1)


def test_helpers_are_the_identity_without_a_process_group():
    t = torch.ones(2)
    assert coll.all_reduce_(t) is t
    assert coll.all_reduce_host([1, 2.5]) == [1.0, 2.5]
    assert coll.all_gather_object({"a": 1}) == [{"a": 1}]
    coll.barrier()


def step_batches(rank: int, step: int):
    """Two micro-batches per rank; rank 0's carry an image, rank 1's are text only (the dummy vision pass)."""
    base = 100 * step + 10 * rank
    first = [random_sample(base, 17, image=rank == 0), random_sample(base + 1, 9)]
    return [pack(first), pack([random_sample(base + 2, 21, answer=6)])]


def train_steps(ckpt: str, info, rank: int, *, default_device: str | None) -> list[tuple[float, float]]:
    """Three optimizer steps of the trainer's data-parallel strategy; the step runs (forward, backward,
    normalisers, clipping, optimizer) with `default_device` as torch's default device."""
    torch.manual_seed(0)
    root, model = build_sharded_model(ckpt, lambda m: TrainModule(m, chunk_size=8, aux_coef=0.01), info)
    cfg = TrainConfig()
    cfg.optim.lr = 1e-2
    optimizer = build_optimizer(model, cfg)
    strategy = DataParallelStep(root, info.device, info.dp_size, info.dp_group)
    out = []
    for step in range(3):
        micro = step_batches(rank, step)  # the data pipeline builds batches on the host, before the step
        if default_device is not None:
            torch.set_default_device(default_device)
        try:
            loss, tokens, labels = strategy.forward_backward(micro)
            r = finish_step(optimizer, micro, loss, tokens, labels, 1.0, "stop", step)
        finally:
            torch.set_default_device(None)
        out.append((r.loss, r.grad_norm))
    return out


def _collectives_and_steps(rank: int, world: int, ckpt: str, moe: bool) -> dict:
    from vlmtune.models.qwen3_vl import load_config
    from vlmtune.parallel.mesh import init_distributed

    parallel = ParallelConfig(ep=2) if moe else ParallelConfig()
    info = init_distributed("cpu", parallel, load_config(ckpt))
    result = {"reduced": coll.all_reduce_(torch.tensor([rank + 1.0])).tolist()}
    result["host"] = coll.all_reduce_host([rank, 1], op="sum")
    result["objects"] = coll.all_gather_object(f"rank{rank}")
    counts = coll.all_to_all_counts(torch.tensor([10 * rank, 10 * rank + 1]), None)
    result["counts"] = counts.tolist()
    rows = torch.full((3, 2), float(rank), requires_grad=True)  # 1 row to rank 0, 2 rows to rank 1
    got = coll.all_to_all_rows(rows, [1, 1] if rank == 0 else [2, 2], [1, 2], None)
    got.sum().backward()
    result["rows"], result["row_grads"] = got[:, 0].tolist(), rows.grad[:, 0].tolist()
    coll.barrier()
    # Negative controls under the meta default: the two crashes, in CPU form.
    torch.set_default_device("meta")
    try:
        with pytest.raises(RuntimeError, match="collective on a meta tensor over a group that needs cpu"):
            coll.all_reduce_(torch.tensor([1.0]))  # a host-built tensor handed to the process group
        grad = torch.ones(3, device="cpu")
        with pytest.raises(RuntimeError, match="meta"):
            torch.stack([torch.zeros(()), grad.norm()])  # a device-less zero stacked with real norms
    finally:
        torch.set_default_device(None)
    result["normal"] = train_steps(ckpt, info, rank, default_device=None)
    result["meta_default"] = train_steps(ckpt, info, rank, default_device="meta")
    return result


def _check(results: list[dict]) -> None:
    for rank, r in enumerate(results):
        assert r["reduced"] == [3.0] and r["host"] == [1.0, 2.0]
        assert r["objects"] == ["rank0", "rank1"]
        assert r["counts"] == [rank, 10 + rank]
        assert r["rows"] == ([0.0, 1.0] if rank == 0 else [0.0, 0.0, 1.0, 1.0])
        assert r["row_grads"] == [1.0, 1.0, 1.0]
        # The whole step runs with every tensor it creates on the compute device: same numbers.
        assert r["meta_default"] == r["normal"]
        assert torch.isfinite(torch.tensor(r["normal"])).all()
    assert results[0]["normal"] == results[1]["normal"]  # loss and norm are over all ranks


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dense"))
    save_pretrained(small_vocab_model(torch.float32), d)
    return d


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("moe"))
    save_pretrained(small_vocab_model(torch.float32, moe=MOE), d)
    return d


@pytest.mark.slow
def test_two_rank_step_creates_nothing_off_the_compute_device(dense_ckpt):
    _check(run_ranks(_collectives_and_steps, 2, dense_ckpt, False))


@pytest.mark.slow
def test_two_rank_expert_parallel_step_creates_nothing_off_the_compute_device(moe_ckpt):
    """The same under expert parallelism: counts and rows cross ranks by all-to-all in every MoE layer."""
    _check(run_ranks(_collectives_and_steps, 2, moe_ckpt, True))


def test_clip_and_norm_builds_its_scalar_on_the_gradients_device():
    """With a default device that is not the gradients' device, clipping still works (the coefficient is
    made on the gradients' device, not by `torch.tensor(total)`)."""
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    torch.set_default_device("meta")
    try:
        total = clip_and_norm([p], max_norm=1.0)
    finally:
        torch.set_default_device(None)
    assert total == pytest.approx(6.0)
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
