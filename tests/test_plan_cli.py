"""`vlmtune plan` end to end: output, JSON, overrides, the length index, layouts that fit, bad input."""

from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

import pytest
import torch
import yaml

from vlmtune.cli import main
from vlmtune.models.qwen3_vl import args_from_hf_dict
from vlmtune.testing import tiny_config_dict
from vlmtune.train.config import load
from vlmtune.train.lora import LoraSetup, analytic_trainable
from vlmtune.train.plan import GPUS, Hardware, make_workload
from vlmtune.train.plan_activations import checkpointed_blocks
from vlmtune.train.plan_memory import Layout, Precision, build_meta_model, state_memory
from vlmtune.train.plan_search import candidate_layouts, make_context

MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


def write_run(tmp_path, *, moe=None, index=None, visual=None, lora=None, **train) -> str:
    """A tiny model's config.json (no weights) and a training YAML pointing at it; returns the YAML path."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny_config_dict(moe=moe)))
    cache = tmp_path / "cache"
    if index is not None:
        cache.mkdir()
        record = {"key": "k", "lengths": index, "bad": {}, **({"visual": visual} if visual else {})}
        (cache / "length_index.json").write_text(json.dumps(record))
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": {"init_from_hf": str(model), "activation_checkpointing": "full"},
        "data": {"dataset": "train.json", "cache_dir": str(cache), "cutoff_len": 512},
        "train": {"train_iters": 10, "micro_batch_tokens": 1024, "global_batch_tokens": 8192, **train},
        "logging": {"tensorboard": False},
        **({"lora": lora} if lora else {}),
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_text_report(tmp_path, capsys):
    cfg = write_run(tmp_path, mixed_precision="bf16")
    assert main(["plan", cfg, "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    for needle in ("per rank (GiB)", "parameters", "optimizer", "vision tower", "decoder", "chunked loss",
                   "FSDP buffers", "peak", "tokens/s", "MFU", "layouts that fit", "--parallel.dp_shard=",
                   "assumptions:", "no length index"):  # fmt: skip
        assert needle in out, needle


def test_json_and_suggestions_are_ready_overrides(tmp_path, capsys):
    cfg = write_run(tmp_path, mixed_precision="bf16")
    plan = run_json(capsys, cfg, "--gpus-per-node", "4", "--gpu", "a100-40g")
    assert plan["hardware"]["gpu"] == GPUS["a100-40g"].name and plan["hardware"]["peak_tflops"] == 312.0
    conf = plan["configured"]
    assert conf["layout"]["dp_shard"] == 4 and conf["fits"]
    states = conf["states"]
    assert conf["peak_bytes"] > states["params"] + states["grads"] + states["optimizer"]
    speeds = [s["tokens_per_s"] for s in plan["suggestions"]]
    assert speeds and speeds == sorted(speeds, reverse=True)
    for s in plan["suggestions"]:
        assert s["fits"] and s["peak_bytes"] <= 0.9 * s["memory"]
        # The override line is accepted as is and reproduces the suggestion.
        again = run_json(
            capsys, cfg, "--gpus-per-node", "4", "--gpu", "a100-40g", *shlex.split(s["override"])
        )
        assert again["configured"]["peak_bytes"] == pytest.approx(s["peak_bytes"])
        assert again["configured"]["tokens_per_s"] == pytest.approx(s["tokens_per_s"])


def test_options_after_config_and_overrides(tmp_path, capsys):
    cfg = write_run(tmp_path)
    plan = run_json(capsys, cfg, "--parallel.tp=2", "--gpu", "h200", "--gpus-per-node", "2", "--nodes", "2")
    layout = plan["configured"]["layout"]
    assert (layout["tp"], layout["dp_shard"]) == (2, 2)
    assert plan["hardware"]["nodes"] == 2 and plan["hardware"]["gpu"] == "H200 141GB"
    # fp32 training keeps fp32 activations: bf16 halves the decoder's saved bytes (fp32 norm inputs aside)
    bf16 = run_json(capsys, cfg, "--train.mixed_precision=bf16")
    fp32 = run_json(capsys, cfg)
    assert bf16["configured"]["activations"]["decoder"] < fp32["configured"]["activations"]["decoder"]


def test_unknown_gpu_memory_without_peak_predicts_no_time(tmp_path, capsys):
    cfg = write_run(tmp_path)
    plan = run_json(capsys, cfg, "--gpu-memory", "20")
    assert plan["hardware"]["memory_gib"] == 20 and plan["hardware"]["peak_tflops"] is None
    assert plan["configured"]["step_s"] is None and "--logging.peak_tflops" in plan["configured"]["time_note"]
    peaks = [s["peak_bytes"] for s in plan["suggestions"]]
    assert peaks == sorted(peaks)  # no time: the smallest first
    plan = run_json(
        capsys, cfg, "--gpu-memory", "20", "--logging.peak_tflops=100", "--train.mixed_precision=bf16"
    )
    assert plan["configured"]["mfu"] > 0
    fp32 = run_json(capsys, cfg, "--gpu", "h100-80g")  # fp32 compute: the table's peaks are bf16 ones
    assert fp32["configured"]["step_s"] is None and "fp32" in fp32["configured"]["time_note"]


def test_nothing_fits(tmp_path, capsys):
    cfg = write_run(tmp_path)
    assert main(["plan", cfg, "--gpu-memory", "3.1", "--gpu", "h100-80g"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "none: more GPUs" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus"], "unknown argument"),
        (["--train.nope=1"], "train.nope: unknown key"),
        (["--nodes", "0"], "--nodes must be >= 1"),
        (["--vision-share", "2"], "--vision-share"),
        (["--model.init_from_hf=/nonexistent"], "no config.json in '/nonexistent'"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, argv, message):
    cfg = write_run(tmp_path)
    assert main(["plan", cfg, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_impossible_configured_layout_still_suggests(tmp_path, capsys):
    cfg = write_run(tmp_path)
    assert main(["plan", cfg, "--parallel.tp=3", "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "configured layout cannot run: dp_replicate x tp x pp x cp = 3 does not divide" in out
    assert "1. " in out


def test_length_index_packing(tmp_path):
    lengths = [100, 900, None, 300, 2000, 700, 20, 500]  # None: a bad sample; 2000 > the budget
    cfg = load(write_run(tmp_path, index=lengths), check_paths=False)
    args = args_from_hf_dict(tiny_config_dict())
    work = make_workload(cfg, args, 1024, 0.25, max_patches=1024)
    assert "length_index.json: 6 samples, 25% vision tokens" in work.source
    assert sum(b.tokens for b in work.bins) == 100 + 900 + 300 + 700 + 20 + 500
    assert all(b.tokens <= 1024 for b in work.bins)
    assert work.largest.tokens == max(b.tokens for b in work.bins) and work.longest_sample == 900
    assert work.largest.patches == 4 * sum(int(n * 0.25) for n in work.largest.sample_lengths)
    (tmp_path / "no_index").mkdir()
    no_index = load(write_run(tmp_path / "no_index"), check_paths=False)
    full = make_workload(no_index, args, 1024, None, max_patches=1024)
    assert full.largest.sample_lengths == [512, 512]  # full rows of data.cutoff_len samples
    assert full.largest.patches == 4 * 1024 // 2  # half of the tokens are vision tokens by default


def test_vision_tokens_from_the_index_when_it_records_them(tmp_path):
    cfg = load(write_run(tmp_path, index=[300, 500], visual=[100, 0]), check_paths=False)
    work = make_workload(cfg, args_from_hf_dict(tiny_config_dict()), 1024, None, max_patches=64)
    assert "vision tokens from the index" in work.source
    assert work.largest.patches == 4 * 100
    assert max(h * w for _, h, w in work.largest.grids) <= 64  # split into images of at most 64 patches


def test_pipeline_stages(tmp_path, capsys):
    cfg_path = write_run(tmp_path, mixed_precision="bf16")
    piped = run_json(
        capsys, cfg_path, "--gpus-per-node", "2", "--parallel.pp=2", "--parallel.llm_pp_layers=[1,2]"
    )
    conf = piped["configured"]
    assert (conf["layout"]["pp"], conf["layout"]["dp_shard"], conf["accumulation"]) == (2, 1, 8)
    assert conf["step_s"] > 0
    # The stages split the model exactly: stage 0 the vision tower, embeddings and layer 0 (2 micro-batches
    # in flight under 1F1B), stage 1 layers 1-2, the final norm and lm_head.
    cfg = load(cfg_path, check_paths=False)
    ctx = make_context(cfg, Hardware(GPUS["h100-80g"], 1, 2, 989.0))
    layout = Layout(dp_shard=1, pp=2, llm_pp_layers=[1, 2])
    stages = [state_memory(ctx.records, layout, ctx.precision, args=ctx.args, rank=r) for r in (0, 1)]
    whole = state_memory(ctx.records, Layout(), ctx.precision, args=ctx.args)
    assert stages[0].params + stages[1].params == whole.params
    assert conf["states"]["params"] in (stages[0].params, stages[1].params)
    assert conf["in_flight"] == (2 if conf["states"]["params"] == stages[0].params else 1)


def test_moe_layouts_use_expert_parallelism_and_no_pipeline(tmp_path):
    cfg = load(write_run(tmp_path, moe=MOE), check_paths=False)
    ctx = make_context(cfg, Hardware(GPUS["h100-80g"], 1, 4, 989.0))
    layouts = candidate_layouts(ctx, pipeline_ok=False)
    assert {lay.ep for lay in layouts} == {1, 2, 4} and {lay.pp for lay in layouts} == {1}
    assert all(lay.world == 4 and 8 % lay.ep == 0 for lay in layouts)
    with_pipelines = candidate_layouts(ctx, pipeline_ok=True)  # MoE runs under PP (and PP x EP) too
    assert {lay.pp for lay in with_pipelines} == {1, 2, 4} and any(
        lay.pp > 1 and lay.ep > 1 for lay in with_pipelines
    )
    args = ctx.args
    fp32 = Precision(torch.float32, torch.float32, torch.float32)
    one = state_memory(ctx.records, Layout(dp_shard=4, ep=1), fp32, args=args)
    four = state_memory(ctx.records, Layout(dp_shard=4, ep=4), fp32, args=args)
    assert one.params == four.params  # experts sharded 4 ways either way (FSDP or EP)
    assert "language_model.layers.0.experts" in four.unit_gathered  # EP: experts are their own FSDP unit
    assert four.unit_gathered["language_model.layers.0.experts"] == 8 // 4 * 3 * 64 * 32 * 4


def test_context_parallel_key_is_read_when_present():
    parallel = SimpleNamespace(
        dp_replicate=1, dp_shard=2, tp=1, pp=1, ep=1, llm_pp_layers=[], pp_schedule="1f1b"
    )
    assert Layout.from_parallel(parallel).cp == 1
    assert Layout.from_parallel(SimpleNamespace(**vars(parallel), cp=2)).world == 4


def test_lora_plan_counts_the_adapters_the_trainer_places(tmp_path, capsys):
    lora = {"rank": 8, "vision_projector": True, "modules_to_save": ["merger"]}
    cfg_path = write_run(tmp_path, lora=lora, mixed_precision="bf16")
    plan = run_json(capsys, cfg_path, "--gpus-per-node", "1")
    summary = plan["model"]["lora"]
    cfg = load(cfg_path, check_paths=False)
    args = args_from_hf_dict(tiny_config_dict())
    setup = LoraSetup(cfg, args, seed=0, master_dtype=torch.float32, compute_dtype=torch.bfloat16)
    trainable = analytic_trainable(args, setup)  # from the model's dimensions, not from the placed model
    assert summary["trainable_parameters"] == trainable
    # 3 layers x 7 decoder Linears, fc1 + fc2 of the 2 DeepStack mergers (the merger is trained whole)
    assert (summary["adapted_modules"], summary["modules_to_save"]) == (3 * 7 + 2 * 2, ["visual.merger"])
    # One rank: the adapters and the merger in fp32 with fp32 gradients and AdamW state, the rest in bf16.
    states = plan["configured"]["states"]
    model = build_meta_model(args)
    base, merger = (sum(p.numel() for p in m.parameters()) for m in (model, model.visual.merger))
    assert states["grads"] == 4 * trainable and states["optimizer"] == 8 * trainable
    assert states["params"] == 4 * trainable + 2 * (base - merger)
    assert main(["plan", cfg_path, "--gpus-per-node", "1"]) == 0
    out = capsys.readouterr().out
    line = "lora      rank 8 on 25 modules, visual.merger trained whole; frozen base in bfloat16; "
    assert line in out and f"{trainable / 1e6:.1f}M trainable parameters in float32" in out


def test_qlora_plan_stores_the_decoder_in_nf4_and_suggests_no_tp_or_pp(tmp_path, capsys):
    cfg = write_run(tmp_path, lora={"rank": 8, "base_quant": "nf4"}, mixed_precision="bf16")
    plain = run_json(capsys, cfg, "--gpus-per-node", "4", "--lora.base_quant=none")
    qlora = run_json(capsys, cfg, "--gpus-per-node", "4")
    assert qlora["configured"]["states"]["params"] < plain["configured"]["states"]["params"]
    assert qlora["configured"]["states"]["grads"] == plain["configured"]["states"]["grads"]
    hw = Hardware(GPUS["h100-80g"], 1, 4, 989.0)
    searched = {
        quant: {(lay.tp, lay.pp) for lay in candidate_layouts(make_context(cfg_q, hw), pipeline_ok=True)}
        for quant, cfg_q in (
            ("none", load(cfg, ["--lora.base_quant=none"], check_paths=False)),
            ("nf4", load(cfg, check_paths=False)),
        )
    }
    assert {(2, 1), (1, 2)} <= searched["none"] and searched["nf4"] == {(1, 1)}  # NF4: no tp, no pp
    assert qlora["suggestions"] and all(
        (s["layout"]["tp"], s["layout"]["pp"]) == (1, 1) for s in qlora["suggestions"]
    )
    assert main(["plan", cfg, "--gpus-per-node", "4"]) == 0
    assert "frozen base in bfloat16, decoder Linears NF4" in capsys.readouterr().out


def test_activation_checkpointing_modes():
    assert checkpointed_blocks("none", 3, 4) == (frozenset(), False)
    assert checkpointed_blocks("full", 3, 4) == (frozenset(range(7)), False)
    # every second block of [vision blocks, decoder layers]; `selective` is Megatron's core-attention recompute
    assert checkpointed_blocks("every_other", 3, 4) == (frozenset({0, 2, 4, 6}), False)
    assert checkpointed_blocks("selective", 3, 4) == (frozenset(), True)


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--nodes",
        "--gpus-per-node",
        "--gpu ",
        "--gpu-memory",
        "--efficiency",
        "--vision-share",
        "--json",
    ):
        assert option in out


def test_context_parallel_all_to_alls_are_exposed_time(tmp_path):
    """cp2's Ulysses all-to-alls (q/k/v in, the output back, (cp - 1)/cp of each, forward, backward and the
    full-checkpointing recompute) are exposed communication; FSDP's traffic spans dp_shard x cp."""
    from vlmtune.train.plan import estimate

    cfg = load(write_run(tmp_path, mixed_precision="bf16"), check_paths=False)
    ctx = make_context(cfg, Hardware(GPUS["h100-80g"], 1, 2, 989.0))
    t = ctx.args.text
    for ac, passes in (("none", 2), ("full", 3)):
        plain = estimate(ctx, Layout(dp_shard=2), ac, 1024)
        split = estimate(ctx, Layout(dp_shard=1, cp=2), ac, 1024)
        assert plain.time_parts["exposed_comm_s"] == 0
        tokens = ctx.workload(1024).mean_tokens / 2
        kv = max(t.num_key_value_heads, 2)  # repeated up to cp
        sent = t.num_hidden_layers * tokens * 2 * (2 * t.num_attention_heads + 2 * kv) * t.head_dim / 2
        want = passes * sent / (GPUS["h100-80g"].link_gbs * 1e9)
        assert split.time_parts["exposed_comm_s"] == pytest.approx(want, rel=1e-12)
        assert split.time_parts["fsdp_s"] == pytest.approx(plain.time_parts["fsdp_s"], rel=1e-12)
