"""`vlmtune train` under context parallelism (torchrun, gloo): rows with a long video (5 frame-pairs) and
packed image / text samples. Each layout logs the losses, gradient norms and validation loss of the
one-process run; a checkpoint saved under cp2 continues under cp1 with the uninterrupted losses; cp with pp
is refused before anything runs."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from test_train_parallel import losses, torchrun
from test_train_utils import run_config
from vlmtune.demo import make_dataset
from vlmtune.errors import ParallelError
from vlmtune.models.qwen3_vl import load_config
from vlmtune.train.config import from_dict
from vlmtune.train.metrics import read_metrics
from vlmtune.train.run_setup import check_config
from vlmtune.train.trainer import train

STEPS = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, video_paths):
    """The demo's VQA images plus two clips sampled to 10 frames (5 frame-pairs), one per step group."""
    d = str(tmp_path_factory.mktemp("vqa_video"))
    make_dataset(d, n_train=10, n_eval=1, seed=1)
    clip = next(p for p in video_paths if p.endswith("carphone_pristine.mp4"))
    shutil.copy(clip, os.path.join(d, "clip.mp4"))
    path = os.path.join(d, "train.json")
    with open(path) as f:
        samples = json.load(f)
    for i, answer in enumerate(["A phone call.", "A man talks."]):
        messages = [
            {"role": "user", "content": "<video>What happens?"},
            {"role": "assistant", "content": answer},
        ]
        samples.insert(3 + 5 * i, {"id": f"clip-{i}", "messages": messages, "videos": ["clip.mp4"]})
    with open(path, "w") as f:
        json.dump(samples, f)
    return d


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    """4 query / 2 key-value heads: cp2 divides the key-value heads; under tp2 (1 per rank) cp2 repeats them."""
    from vlmtune.testing import make_tiny_checkpoint

    d = str(tmp_path_factory.mktemp("cp_dense_run"))
    make_tiny_checkpoint(
        d, seed=0, text_hidden=32, text_layers=2, heads=4, kv_heads=2, head_dim=16,
        vision_hidden=32, vision_depth=2, vision_heads=2, deepstack=(0,),
    )  # fmt: skip
    return d


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    from vlmtune.testing import make_tiny_checkpoint

    d = str(tmp_path_factory.mktemp("cp_moe_run"))
    make_tiny_checkpoint(
        d, seed=0, text_hidden=32, text_layers=2, heads=2, kv_heads=1, head_dim=16, vision_hidden=32,
        vision_depth=2, deepstack=(0,), moe=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    )  # fmt: skip
    return d


def config(out, ckpt, data_dir, **sections) -> dict:
    """Validation on the held-out sample every 2 steps: the no-grad path under cp is compared too."""
    data = {"video_min_frames": 10, "video_max_frames": 10, "video_max_pixels": 10 * 96 * 96,
            "val_dataset": "heldout.json"}  # fmt: skip
    raw = run_config(
        out,
        ckpt,
        data_dir,
        steps=STEPS,
        keep_last=1,
        data=data,
        loss={"aux_loss_coef": 0.02},
        eval={"interval": 2},
    )
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def logged(out, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(str(out)) if key in r}


def assert_same_run(out, reference, steps) -> None:
    """Losses within 1e-5, gradient norms within 1e-4 (relative) of the one-process run at `steps`, and the
    validation loss at step 2."""
    got = {key: logged(out, key) for key in reference}
    for key, tol, at in (("loss", 1e-5, steps), ("grad_norm", 1e-4, steps), ("val_loss", 1e-5, [2])):
        for s in at:
            assert abs(got[key][s] - reference[key][s]) <= tol * abs(reference[key][s]), (
                key,
                s,
                got,
                reference,
            )


def reference_run(out, ckpt, data_dir) -> dict:
    train(from_dict(config(out, ckpt, data_dir)))
    return {key: logged(out, key) for key in ("loss", "grad_norm", "val_loss")}


@pytest.fixture(scope="module")
def dense_reference(tmp_path_factory, dense_ckpt, dataset):
    return reference_run(tmp_path_factory.mktemp("cp_dense_ref"), dense_ckpt, dataset)


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory, moe_ckpt, dataset):
    return reference_run(tmp_path_factory.mktemp("cp_moe_ref"), moe_ckpt, dataset)


def test_the_rows_hold_a_long_video_and_packed_samples(dense_ckpt, dataset):
    """What the runs below train on: a row with the 5-frame-pair clip, rows of several image samples."""
    from vlmtune.data import build_loader, build_processor, load_samples

    cfg = from_dict(config("unused", dense_ckpt, dataset))
    processor = build_processor(dense_ckpt, cfg.data)
    samples, _, _ = load_samples(cfg.data, seed=cfg.train.seed)
    rows = list(build_loader(cfg.data, processor, samples=samples, max_tokens=cfg.train.micro_batch_tokens))
    assert any(b.video_grid_thw is not None and b.video_grid_thw[0, 0] == 5 for b in rows)
    assert any(b.image_grid_thw is not None and len(b.image_grid_thw) >= 2 for b in rows)


@pytest.mark.slow
def test_cp2_checkpoint_continues_under_cp1(tmp_path, dense_ckpt, dataset, dense_reference):
    """cp2 steps 1-2 (checkpoint each step), then the step-2 checkpoint resumed by one process: step 3."""
    out = tmp_path / "cp2"
    torchrun(out, config(out, dense_ckpt, dataset, train={"train_iters": 2}, parallel={"cp": 2}), 2)
    assert_same_run(out, dense_reference, [1, 2])
    resumed = tmp_path / "cp1"
    shutil.copytree(out, resumed)
    train(from_dict(config(resumed, dense_ckpt, dataset)))
    assert losses(resumed)[3] == pytest.approx(dense_reference["loss"][3], rel=1e-5)
    assert logged(resumed, "val_loss")[3] == pytest.approx(dense_reference["val_loss"][3], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"dp_shard": 2}, {"tp": 2}], ids=["dp_shard2", "tp2"])
def test_cp2_with_dp_shard2_or_tp2_dense(tmp_path, dense_ckpt, dataset, dense_reference, layout):
    out = tmp_path / "run"
    torchrun(out, config(out, dense_ckpt, dataset, train={"train_iters": 2}, parallel={"cp": 2, **layout}), 4)
    assert_same_run(out, dense_reference, [1, 2])


@pytest.mark.slow
@pytest.mark.parametrize("layout,nproc", [({}, 2), ({"dp_shard": 2, "ep": 2}, 4)], ids=["cp2", "cp2_dp2_ep2"])
def test_cp2_moe(tmp_path, moe_ckpt, dataset, moe_reference, layout, nproc):
    out = tmp_path / "run"
    torchrun(
        out, config(out, moe_ckpt, dataset, train={"train_iters": 2}, parallel={"cp": 2, **layout}), nproc
    )
    assert_same_run(out, moe_reference, [1, 2])


def test_cp_with_pp_is_refused_before_anything_runs(dense_ckpt, dataset):
    cfg = from_dict(
        config("unused", dense_ckpt, dataset, parallel={"cp": 2, "pp": 2, "llm_pp_layers": [1, 1]})
    )
    with pytest.raises(ParallelError, match="parallel.cp > 1 with parallel.pp > 1 is not supported"):
        check_config(cfg, load_config(dense_ckpt), 4)
