"""The `parallel:` section: sizes resolved against the world and the model, errors that say what works,
and the DeviceMesh it builds (4 gloo ranks)."""

from __future__ import annotations

import pytest

from dist_utils import run_ranks
from vlmtune.errors import ParallelError
from vlmtune.models.qwen3_vl import args_from_hf_dict
from vlmtune.parallel.layout import ParallelConfig, build_mesh, even_split, resolve
from vlmtune.testing import tiny_config_dict

DENSE = args_from_hf_dict(tiny_config_dict(text_layers=4))
MOE = args_from_hf_dict(
    tiny_config_dict(moe=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8))
)


def test_dp_shard_fills_the_world():
    assert resolve(ParallelConfig(tp=2), 8, DENSE).dp_shard == 4
    assert resolve(ParallelConfig(tp=2, pp=2, llm_pp_layers=[2, 2]), 8, DENSE).dp == 2
    assert resolve(ParallelConfig(dp_replicate=2, ep=2), 8, MOE).dp_shard == 4


@pytest.mark.parametrize(
    "cfg, world, args, message",
    [
        (ParallelConfig(tp=3), 8, DENSE, r"must be one of 1, 2, 4, 8"),
        (ParallelConfig(dp_shard=3, tp=2), 8, DENSE, r"set parallel.dp_shard: -1 or 4"),
        (ParallelConfig(tp=4), 8, DENSE, r"num_key_value_heads=2"),
        (ParallelConfig(ep=2), 4, DENSE, r"needs a MoE model"),
        (ParallelConfig(ep=3), 6, MOE, r"ep=3 does not divide num_experts=4"),
        (ParallelConfig(ep=4, tp=2), 4, MOE, r"ep can be one of 1, 2"),
        (ParallelConfig(pp=2), 2, DENSE, r"needs parallel.llm_pp_layers, e.g. \[2, 2\]"),
        (ParallelConfig(pp=2, llm_pp_layers=[1, 2]), 2, DENSE, r"sums to 3; the model has 4"),
        (ParallelConfig(pp_schedule="gpipe"), 1, DENSE, r"'1f1b' or 'interleaved'"),
        (ParallelConfig(pp=2, llm_pp_layers=[1, 1, 1, 1]), 2, DENSE, r"1f1b runs one stage per rank"),
        (
            ParallelConfig(pp=2, pp_schedule="interleaved", llm_pp_layers=[2, 2]),
            2,
            DENSE,
            r"interleaved needs at least 2 stages per rank",
        ),
    ],
)
def test_errors_say_what_works(cfg, world, args, message):
    with pytest.raises(ParallelError, match=message):
        resolve(cfg, world, args)


def test_even_split_puts_the_remainder_late():
    assert even_split(28, 4) == [7, 7, 7, 7]
    assert even_split(36, 5) == [7, 7, 7, 7, 8]


def mesh_facts(rank, world):
    mesh = build_mesh(resolve(ParallelConfig(dp_shard=2, ep=2, tp=2), world, MOE), "cpu")
    return {name: mesh[name].size() for name in ("pp", "dp_shard", "ep", "tp", "dp", "dp_shard_mod_ep")}


def test_mesh_dimensions():
    for facts in run_ranks(mesh_facts, 4):
        assert facts == {"pp": 1, "dp_shard": 2, "ep": 2, "tp": 2, "dp": 2, "dp_shard_mod_ep": 1}


def hsdp_facts(rank, world):
    mesh = build_mesh(resolve(ParallelConfig(dp_replicate=2), world, DENSE), "cpu")
    hsdp = mesh["dp_replicate", "dp_shard"]
    return hsdp.mesh.tolist(), mesh["dp"].size()


def test_hsdp_mesh():
    for ranks, dp in run_ranks(hsdp_facts, 4):
        assert ranks == [[0, 1], [2, 3]] and dp == 4
