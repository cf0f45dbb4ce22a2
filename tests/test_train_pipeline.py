"""`vlmtune train` under pipeline parallelism equals one process: MoE with the router aux loss, PP x EP, tied
embeddings, TP x PP, the interleaved schedule with the vision tower split over two stages, validation, and
checkpoints that continue under other layouts.

Runs are the CLI under torchrun, or — where a test must look at the weights on each stage afterwards — the
same `Trainer` the CLI runs, on gloo ranks started by `dist_utils.run_ranks`. Every run trains the same data
per step as the one-process run, so the logged losses (and gradient norms, and validation losses) must match
it: losses within 1e-5 relative, gradient norms within 1e-4.
"""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from dist_utils import run_ranks
from test_train_parallel import ROOT, torchrun
from test_train_utils import run_config
from vlmtune.demo import make_dataset
from vlmtune.parallel.layout import ParallelConfig
from vlmtune.train.config import from_dict
from vlmtune.train.metrics import read_metrics
from vlmtune.train.trainer import train

STEPS = 4
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("vqa_pp"))
    make_dataset(d, n_train=40, n_eval=3, seed=1)
    return d


def checkpoint(tmp_path_factory, name: str, **kwargs) -> str:
    from vlmtune.testing import make_tiny_checkpoint

    d = str(tmp_path_factory.mktemp(name))
    make_tiny_checkpoint(
        d, seed=0, text_hidden=32, head_dim=16, vision_hidden=32, vision_depth=2, deepstack=(0,), **kwargs
    )
    return d


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    return checkpoint(tmp_path_factory, "moe", text_layers=2, heads=2, kv_heads=2, moe=MOE)


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory):
    """Four heads everywhere (tp=2 divides them), tied embeddings as Qwen3-VL 2B/4B."""
    return checkpoint(
        tmp_path_factory, "tied", text_layers=2, heads=4, kv_heads=2, vision_heads=4, tie_word_embeddings=True
    )


@pytest.fixture(scope="module")
def deep_ckpt(tmp_path_factory):
    """Four decoder layers: four pipeline stages."""
    return checkpoint(tmp_path_factory, "deep", text_layers=4, heads=2, kv_heads=2)


def config(out, ckpt, data_dir, **sections) -> dict:
    return run_config(out, ckpt, data_dir, steps=STEPS, keep_last=1, **sections)


def metric(out, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(str(out)) if key in r}


def assert_close(got: dict, want: dict, steps, tol: float = 1e-5) -> None:
    assert set(steps) <= set(got), (got, steps)
    for s in steps:
        assert abs(got[s] - want[s]) <= tol * abs(want[s]), (s, got, want)


def assert_same_run(out, ref_out, steps) -> None:
    """Per-step losses (1e-5) and gradient norms (1e-4) of `out` equal the reference run's."""
    assert_close(metric(out, "loss"), metric(ref_out, "loss"), steps)
    assert_close(metric(out, "grad_norm"), metric(ref_out, "grad_norm"), steps, tol=1e-4)


def reference(tmp_path_factory, name: str, ckpt: str, data_dir: str, **sections):
    out = tmp_path_factory.mktemp(name)
    train(from_dict(config(out, ckpt, data_dir, **sections)))
    return out


def moe_config(out, ckpt, data_dir, *, steps: int = STEPS, validate: bool = True, **parallel) -> dict:
    """MoE runs: the router aux loss on (coefficient 0.1), 4 micro-batches per step (2 per rank when two
    data shards share them: PP x EP still fills both stages), a validation split checked every step."""
    sections = dict(train={"train_iters": steps, "global_batch_tokens": 1200}, loss={"aux_loss_coef": 0.1})
    if validate:
        sections.update(data={"val_dataset": "heldout.json"}, eval={"interval": 1})
    return config(out, ckpt, data_dir, parallel=parallel, **sections)


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory, moe_ckpt, dataset):
    out = tmp_path_factory.mktemp("moe_ref")
    train(from_dict(moe_config(out, moe_ckpt, dataset)))
    return out


@pytest.mark.slow
def test_pp2_moe_with_aux_and_validation_resumes_under_ep2_and_one_process(
    tmp_path, moe_ckpt, dataset, moe_reference
):
    """PP2 on the MoE model for steps 1-2 (aux loss pooled across the stages; validation by the forward-only
    schedule), then its checkpoint continues under EP2 without PP and under one process for steps 3-4."""
    pp = tmp_path / "pp2"
    torchrun(pp, moe_config(pp, moe_ckpt, dataset, steps=2, pp=2, llm_pp_layers=[1, 1]), 2)
    assert_same_run(pp, moe_reference, [1, 2])
    assert_close(metric(pp, "val_loss"), metric(moe_reference, "val_loss"), [1, 2])
    for name, nproc, parallel in (("ep2", 2, {"ep": 2}), ("one", 1, {})):
        out = tmp_path / name
        shutil.copytree(pp, out)
        raw = moe_config(out, moe_ckpt, dataset, validate=False, **parallel)
        torchrun(out, raw, nproc) if nproc > 1 else train(from_dict(raw))
        assert_same_run(out, moe_reference, [1, 2, 3, 4])


@pytest.mark.slow
def test_pp2_x_ep2_moe_equals_one_process(tmp_path, moe_ckpt, dataset, moe_reference):
    """4 ranks: two pipeline stages, each with its experts spread over two expert-parallel ranks (two data
    shards)."""
    out = tmp_path / "pp2_ep2"
    torchrun(out, moe_config(out, moe_ckpt, dataset, steps=2, pp=2, ep=2, llm_pp_layers=[1, 1]), 4)
    assert_same_run(out, moe_reference, [1, 2])
    assert_close(metric(out, "val_loss"), metric(moe_reference, "val_loss"), [1, 2])


@pytest.mark.slow
def test_interleaved_pp2_four_stages_with_the_vision_tower_split(
    tmp_path, tmp_path_factory, deep_ckpt, dataset
):
    """Four stages on two ranks (rank 0: stages 0 and 2): vision block 0 alone on stage 0 (the DeepStack
    block: dense features travel), block 1 with the merger, the embedding and decoder layers 0-1 on stage 1.
    Steps 1-2, then the checkpoint (each rank saved its two stages as one model) continues in one process."""
    ref = reference(tmp_path_factory, "deep_ref", deep_ckpt, dataset)
    out = tmp_path / "interleaved"
    parallel = {
        "pp": 2,
        "pp_schedule": "interleaved",
        "llm_pp_layers": [0, 2, 1, 1],
        "vit_pp_layers": [1, 1, 0, 0],
    }
    torchrun(out, config(out, deep_ckpt, dataset, train={"train_iters": 2}, parallel=parallel), 2)
    assert_same_run(out, ref, [1, 2])
    train(from_dict(config(out, deep_ckpt, dataset)))
    assert_same_run(out, ref, [1, 2, 3, 4])


def train_and_return_tied_weights(rank, world, raw):
    """The Trainer as `vlmtune train` runs it; returns this rank's copy of the tied embedding (its local
    shard) with the rank's (data, tensor) parallel coordinates and whether it is the embedding stage's copy."""
    from torch.distributed.tensor import DTensor

    from vlmtune.models.qwen3_vl import load_config
    from vlmtune.parallel.mesh import init_distributed
    from vlmtune.train.run_setup import check_config
    from vlmtune.train.trainer import Trainer

    cfg = from_dict(raw)
    args = load_config(cfg.model.init_from_hf)
    check_config(cfg, args, world)
    info = init_distributed(cfg.train.device, cfg.parallel, args)
    trainer = Trainer(cfg, info, args)
    trainer.run()
    tied = trainer.strategy.tied
    weight = tied.param.to_local() if isinstance(tied.param, DTensor) else tied.param
    return (info.dp_rank, info.mesh["tp"].get_local_rank()), tied.owner, weight.detach().clone()


def assert_tied_copies_bitwise_equal(results) -> None:
    pairs: dict = {}
    for coords, owner, weight in results:
        pairs.setdefault(coords, {})[owner] = weight
    assert len(pairs) == len(results) // 2
    for copies in pairs.values():
        assert copies.keys() == {True, False}
        assert copies[True].equal(copies[False])


@pytest.fixture(scope="module")
def tied_reference(tmp_path_factory, tied_ckpt, dataset):
    return reference(tmp_path_factory, "tied_ref", tied_ckpt, dataset, train={"train_iters": 3})


@pytest.mark.slow
def test_pp2_tied_embeddings_stay_bitwise_equal(tmp_path, tied_ckpt, dataset, tied_reference):
    """The embedding (stage 0) and the lm_head (stage 1) are one matrix: after 3 steps both copies are equal
    bit for bit, and the losses are the one-process ones."""
    out = tmp_path / "tied_pp2"
    raw = config(
        out, tied_ckpt, dataset, train={"train_iters": 3}, parallel={"pp": 2, "llm_pp_layers": [1, 1]}
    )
    assert_tied_copies_bitwise_equal(run_ranks(train_and_return_tied_weights, 2, raw))
    assert_same_run(out, tied_reference, [1, 2, 3])


@pytest.mark.slow
def test_tp2_x_pp2_equals_one_process(tmp_path, tied_ckpt, dataset, tied_reference):
    """4 ranks: tensor parallel 2 inside each of two pipeline stages (vocabulary-parallel loss on the last);
    the tied copies, sharded by vocabulary rows, stay equal shard by shard."""
    out = tmp_path / "tp2_pp2"
    parallel = {"pp": 2, "tp": 2, "llm_pp_layers": [1, 1]}
    raw = config(out, tied_ckpt, dataset, train={"train_iters": 2}, parallel=parallel)
    assert_tied_copies_bitwise_equal(run_ranks(train_and_return_tied_weights, 4, raw))
    assert_same_run(out, tied_reference, [1, 2])


@pytest.mark.slow
def test_dp2_x_pp2_x_tp2_on_one_mesh(tmp_path, tmp_path_factory, tied_ckpt, dataset):
    """8 ranks: two data shards (FSDP) x two pipeline stages x tensor parallel 2, one device mesh; each
    data shard takes 2 of the step's 4 micro-batches."""
    steps = {"train_iters": 2, "global_batch_tokens": 1200}
    ref = reference(tmp_path_factory, "tied_ref_1200", tied_ckpt, dataset, train=steps)
    out = tmp_path / "dp2_pp2_tp2"
    raw = config(out, tied_ckpt, dataset, train=steps, parallel={"pp": 2, "tp": 2, "llm_pp_layers": [1, 1]})
    assert_tied_copies_bitwise_equal(run_ranks(train_and_return_tied_weights, 8, raw))
    assert_same_run(out, ref, [1, 2])


# The shipped configs' layer counts (Qwen3-VL 8B, 4B, 30B-A3B); widths do not matter to the layout checks.
SHIPPED = {
    "qwen3vl_8b.yaml": (dict(text_layers=36, vision_depth=27, deepstack=(8, 16, 24)), 8),
    "qwen3vl_4b.yaml": (
        dict(text_layers=36, vision_depth=24, deepstack=(5, 11, 17), tie_word_embeddings=True),
        8,
    ),
    "qwen3vl_30b_a3b.yaml": (
        dict(
            text_layers=48,
            vision_depth=27,
            deepstack=(8, 16, 24),
            moe=dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=8),
        ),
        32,
    ),
}


def commented_parallel_section(path: str) -> dict | None:
    """The `# parallel:` block a config shows as a commented variant, uncommented."""
    lines = open(path).read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("# parallel:")), None)
    if start is None:
        return None
    block = [lines[start][2:]]
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            break
        block.append(line[2:])
    return yaml.safe_load("\n".join(block))["parallel"]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_resolve_on_their_models(name):
    """Each shipped config (and its commented pipeline variant: the seed's [6, 14, 14, 14] / [27, 0, 0, 0]
    for 30B-A3B) passes the trainer's layout checks on the model it names, and fills its pipeline."""
    from vlmtune.models.qwen3_vl import args_from_hf_dict
    from vlmtune.testing import tiny_config_dict
    from vlmtune.train.config import load
    from vlmtune.train.run_setup import accumulation_steps, check_config

    sizes, world = SHIPPED[name]
    args = args_from_hf_dict(tiny_config_dict(**sizes))
    path = os.path.join(ROOT, "configs", name)
    cfg = load(path, check_paths=False)
    variants = [cfg.parallel]
    if (extra := commented_parallel_section(path)) is not None:
        variants.append(ParallelConfig(**{**ParallelConfig().__dict__, **extra}))
    for parallel in variants:
        cfg.parallel = parallel
        layout = check_config(cfg, args, world)
        assert accumulation_steps(cfg, 1, 1, layout.dp) >= layout.pp
    if name == "qwen3vl_30b_a3b.yaml":
        assert (layout.pp, layout.ep, layout.llm_pp_layers, layout.vit_pp_layers) == (
            4,
            8,
            [6, 14, 14, 14],
            [27, 0, 0, 0],
        )


def test_too_few_micro_batches_for_the_schedule_is_a_clear_error(tmp_path, deep_ckpt, dataset):
    """3 micro-batches per step: enough for 1F1B on 2 stages, not for the interleaved schedule (a multiple of
    pp), refused before any model is built."""
    from types import SimpleNamespace

    from vlmtune.errors import ConfigError
    from vlmtune.models.qwen3_vl import load_config
    from vlmtune.parallel.layout import resolve
    from vlmtune.train.trainer import Trainer

    parallel = {"pp": 2, "pp_schedule": "interleaved", "llm_pp_layers": [1, 1, 1, 1]}
    cfg = from_dict(
        config(tmp_path, deep_ckpt, dataset, train={"global_batch_tokens": 900}, parallel=parallel)
    )
    args = load_config(deep_ckpt)
    info = SimpleNamespace(rank=0, dp_rank=0, dp_size=1, parallel=resolve(cfg.parallel, 2, args))
    with pytest.raises(ConfigError, match=r"3 micro-batch\(es\) per step cannot fill 2 pipeline stages"):
        Trainer(cfg, info, args).build_data()
