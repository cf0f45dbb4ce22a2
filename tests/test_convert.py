"""`vlmtune convert`: HF -> native (DCP) -> HF is bitwise; a converted checkpoint loads into any layout."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from dist_utils import run_ranks
from vlmtune import load_pretrained
from vlmtune.checkpoint.hf import checkpoint_files
from vlmtune.cli import main
from vlmtune.testing import make_tiny_checkpoint


def tensors(path):
    out = {}
    for f in checkpoint_files(str(path)):
        out.update(load_file(f))
    return out


def test_round_trip_is_bitwise_and_loads_in_transformers(tiny_ckpt, tmp_path):
    src, hf = tiny_ckpt
    assert main(["convert", "hf-to-native", "--hf", src, "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000000"
    assert (
        main(
            [
                "convert",
                "native-to-hf",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "hf"),
                "--max-shard-gb",
                "0.004",
            ]
        )
        == 0
    )
    a, b = tensors(src), tensors(tmp_path / "hf")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert len(set(os.listdir(tmp_path / "hf"))) > 5  # several shards + assets
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    from transformers import AutoModelForImageTextToText

    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    for k, v in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k


def test_converted_checkpoint_is_what_the_trainer_loads(tiny_ckpt, tmp_path):
    from vlmtune.checkpoint.convert import hf_to_native
    from vlmtune.checkpoint.export import load_model_from_checkpoint

    hf_to_native(tiny_ckpt[0], str(tmp_path))
    ours = load_model_from_checkpoint(str(tmp_path))
    ref = load_pretrained(tiny_ckpt[0])
    for (n, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


def test_moe_round_trip(tmp_path):
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
    make_tiny_checkpoint(str(tmp_path / "src"), seed=2, assets=False, moe=moe)
    from vlmtune.checkpoint.convert import hf_to_native, native_to_hf

    hf_to_native(str(tmp_path / "src"), str(tmp_path / "run"))
    native_to_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
    a = load_pretrained(tmp_path / "src").state_dict()
    b = load_pretrained(tmp_path / "hf").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def load_sharded(rank, world, src, run):
    """The converted checkpoint into TP2 (DTensor shards) and into one pipeline stage of PP2."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from vlmtune.checkpoint.dcp import resolve
    from vlmtune.parallel.pipeline import PipelineStageModule, plan_stages
    from vlmtune.parallel.tensor import apply_tensor_parallel

    ckpt = resolve(run)
    ref = load_pretrained(src).state_dict()
    model = load_pretrained(src)
    for p in model.parameters():
        p.data.zero_()
    apply_tensor_parallel(model, init_device_mesh("cpu", (world,)))
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    for k, v in model.state_dict().items():
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        assert torch.equal(full, ref[k]), k
    model = load_pretrained(src)
    stage = PipelineStageModule(model, plan_stages(model.args, [1, 2], None, 2)[rank])
    for p in stage.parameters():
        p.data.zero_()
    state = {"model": get_model_state_dict(stage.model)}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(stage.model, state["model"])
    for k, v in stage.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    return len(state["model"])


def test_converted_checkpoint_loads_into_tp_and_pp_layouts(tiny_ckpt, tmp_path):
    from vlmtune.checkpoint.convert import hf_to_native

    hf_to_native(tiny_ckpt[0], str(tmp_path))
    counts = run_ranks(load_sharded, 2, tiny_ckpt[0], str(tmp_path))
    assert counts[0] != counts[1]  # each pipeline stage loaded only its own tensors
