"""LoRA through `vlmtune train`: after real steps the exported PEFT adapter loads into transformers + peft with
vlmtune's logits, and `--merge` equals both (dense and MoE); checkpoints hold only the adapters and the
modules trained whole, frozen base weights stay bitwise unchanged, the announced trainable count is the
analytic one; FSDP2 x 2 and TP2 give one process's losses; SIGKILL + resume is bit-exact; QLoRA trains."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from peft import PeftModel
from transformers import AutoModelForImageTextToText

from test_train_checkpoint import launch, wait_for_step
from test_train_parallel import assert_close, losses, torchrun
from test_train_utils import run_config
from vlmtune.checkpoint import dcp as checkpoint
from vlmtune.checkpoint import load_pretrained
from vlmtune.cli import main
from vlmtune.demo import make_dataset
from vlmtune.errors import ConfigError
from vlmtune.infer.load import load_model
from vlmtune.models.qwen3_vl import load_config
from vlmtune.models.qwen3_vl.lora import is_adapter
from vlmtune.parallel.mesh import close_distributed, init_distributed
from vlmtune.testing import make_tiny_checkpoint
from vlmtune.train.config import from_dict, load
from vlmtune.train.flops import Trainable
from vlmtune.train.metrics import micro_batch_flops, read_metrics
from vlmtune.train.run_setup import check_config
from vlmtune.train.trainer import Trainer, train

from model_inputs import build_sample, hf_kwargs, ours_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
RANK = 4
# Every kind in every group, the merger trained whole (so its fc1/fc2 get no adapters).
DENSE_LORA = {
    "rank": RANK,
    "alpha": 8,
    "vision_encoder": True,
    "vision_projector": True,
    "modules_to_save": ["merger"],
}
MOE_LORA = {"rank": RANK, "alpha": 8, "targets": ["all-linear", "router"]}
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, decoder_sparse_step=1)  # not square


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("vqa"))
    make_dataset(d, n_train=40, n_eval=2, seed=1)
    return d


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dense"))
    make_tiny_checkpoint(
        d, seed=0, text_hidden=32, text_layers=2, heads=4, kv_heads=4, head_dim=16,
        vision_hidden=32, vision_depth=2, vision_heads=4, deepstack=(0,),
    )  # fmt: skip
    return d


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("moe"))
    make_tiny_checkpoint(
        d, seed=0, text_hidden=32, text_layers=2, heads=2, kv_heads=2, head_dim=16, vision_hidden=32,
        vision_depth=2, deepstack=(0,), moe=MOE,
    )  # fmt: skip
    return d


def config(out, ckpt, data, lora, **sections) -> dict:
    return run_config(out, ckpt, data, steps=STEPS, keep_last=1, lora=lora, **sections)


def run_in_process(raw, gather_frozen: bool = True) -> dict:
    """Train in this process; return the parameters as trained (whole) and the trainable names."""
    cfg = from_dict(raw)
    args = load_config(cfg.model.init_from_hf)
    check_config(cfg, args, 1)
    info = init_distributed(cfg.train.device, cfg.parallel, args)
    try:
        trainer = Trainer(cfg, info, args)
        steps, train_step = [], trainer.train_step

        def recorded(micro):  # each step's micro-batches and the model FLOPs the trainer counted for MFU
            result = train_step(micro)
            steps.append((micro, result.flops))
            return result

        trainer.train_step = recorded
        trainer.run()
        trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for n, p in trainer.model.named_parameters() if gather_frozen or n in trainable}  # fmt: skip
    finally:
        close_distributed()
    return {"params": full, "trainable": trainable, "steps": steps, "args": args, "spec": trainer.lora.spec}


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, dense_ckpt, dataset):
    out = tmp_path_factory.mktemp("dense_run")
    logger = logging.getLogger("vlmtune")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        result = run_in_process(config(out, dense_ckpt, dataset, DENSE_LORA, checkpoint={"save_hf": True}))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return {"out": out, "log": [r.getMessage() for r in records], **result}


def analytic_dense_count() -> int:
    """DENSE_LORA on `dense_ckpt`, by hand: r x (in + out) per adapted Linear; vision q/k/v share one A."""
    h, q, inter = 32, 4 * 16, 64  # text hidden, heads x head_dim (kv heads = heads), intermediate
    decoder = 4 * RANK * (h + q) + 3 * RANK * (h + inter)  # q k v o; gate up down
    d, vi = 32, 64
    vision = RANK * (d + 3 * d) + RANK * (d + d) + 2 * RANK * (d + vi)  # qkv; proj; fc1 fc2
    merged = 4 * d
    deepstack = RANK * (merged + merged) + RANK * (merged + h)  # the DeepStack merger's fc1, fc2
    merger = 2 * d + merged * merged + merged + merged * h + h  # trained whole: norm, fc1, fc2
    return 2 * decoder + 2 * vision + deepstack + merger


def test_trainable_count_is_analytic_and_base_is_unchanged(dense_run, dense_ckpt):
    line = next(m for m in dense_run["log"] if "parameters trainable" in m)
    trainable = int(line.split(" parameters trainable")[0].rsplit(" ", 1)[1].split("/")[0].replace(",", ""))
    assert trainable == analytic_dense_count()
    assert any(f"{trainable:,} trainable parameters by the model's dimensions" in m for m in dense_run["log"])
    base = dict(load_pretrained(dense_ckpt).named_parameters())
    frozen = [n for n in dense_run["params"] if n not in dense_run["trainable"]]
    assert len(frozen) == len(base) - sum(n.startswith("visual.merger.") for n in base)
    for name in frozen:
        assert torch.equal(dense_run["params"][name], base[name]), name  # bitwise
    adapters_b = [n for n in dense_run["trainable"] if "lora_B" in n]
    assert adapters_b and all(dense_run["params"][n].abs().max() > 0 for n in adapters_b)  # B trained


def test_mfu_counts_the_placed_adapters(dense_run):
    """The trainer's step FLOPs are train/flops.py's for the adapters as placed (the LoraSpec `vlmtune plan`
    reads): frozen base, 6 per adapter parameter and token."""
    spec, args = dense_run["spec"], dense_run["args"]
    assert spec.linears and sum(spec.adapter_params.values()) > 0 and spec.saved == ("visual.merger",)
    for micro, counted in dense_run["steps"]:
        assert counted == sum(micro_batch_flops(args, b, Trainable(), lora=spec) for b in micro)
        assert counted != sum(micro_batch_flops(args, b, Trainable()) for b in micro)


def test_checkpoint_holds_only_adapters_and_their_optimizer_state(dense_run):
    path = checkpoint.latest(str(dense_run["out"]))
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    model_keys = {k[len("model.") :] for k in meta if k.startswith("model.")}
    assert model_keys == dense_run["trainable"]
    assert all(is_adapter(k) or k.startswith("visual.merger.") for k in model_keys)
    optim = {k for k in meta if k.startswith("optim.state.")}
    assert optim and all(k.split(".", 2)[2].rsplit(".", 1)[0] in model_keys for k in optim)


def hf_model(path):
    return AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager",
                                                       experts_implementation="eager").eval()  # fmt: skip


def assert_exports_agree(out, base, tmp_path):
    """`vlmtune export` (PEFT adapter) into transformers + peft, vlmtune with the adapter, and `--merge`."""
    assert main(["export", str(out), "--out", str(tmp_path / "adapter")]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(hf_model(base), str(tmp_path / "adapter")).eval()
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
    ours = load_pretrained(base, adapter=str(tmp_path / "adapter"))
    merged = load_pretrained(str(tmp_path / "merged"))
    s = build_sample([6, ("image", 4, 4), 9], seed=3)
    with torch.no_grad():
        want = peft_model(**hf_kwargs(s)).logits
        assert (ours(**ours_kwargs(s)).logits - want).abs().max() < 1e-5
        assert (merged(**ours_kwargs(s)).logits - want).abs().max() < 1e-5
        assert (hf_model(str(tmp_path / "merged"))(**hf_kwargs(s)).logits - want).abs().max() < 1e-5
        assert (hf_model(base)(**hf_kwargs(s)).logits - want).abs().max() > 1e-3  # the adapter changed it
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        return json.load(f)


def test_dense_export_loads_in_peft_and_merges(dense_run, dense_ckpt, tmp_path):
    cfg = assert_exports_agree(dense_run["out"], dense_ckpt, tmp_path)
    assert cfg["modules_to_save"] == ["model.visual.merger"] and cfg["target_parameters"] is None
    assert os.path.isfile(os.path.join(dense_run["out"], "adapter", "adapter_model.safetensors"))  # save_hf


def test_moe_export_loads_in_peft_and_merges(moe_ckpt, dataset, tmp_path):
    out = tmp_path / "run"
    train(from_dict(config(out, moe_ckpt, dataset, MOE_LORA, train={"train_iters": 2})))
    cfg = assert_exports_agree(out, moe_ckpt, tmp_path)
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in cfg["target_parameters"]
    assert "model.language_model.layers.0.mlp.gate.weight" in cfg["target_parameters"]


@pytest.mark.slow
def test_moe_expert_adapters_under_ep2_equal_one_process(moe_ckpt, dataset, tmp_path):
    one, ep = tmp_path / "one", tmp_path / "ep2"
    train(from_dict(config(one, moe_ckpt, dataset, MOE_LORA, train={"train_iters": 2})))
    torchrun(
        ep,
        config(ep, moe_ckpt, dataset, MOE_LORA, train={"train_iters": 2}, parallel={"dp_shard": 2, "ep": 2}),
        2,
    )
    assert_close(losses(ep), losses(one), [1, 2])


def test_chat_with_adapter_equals_the_merged_model(dense_run, dense_ckpt, tmp_path, capsys):
    assert main(["export", str(dense_run["out"]), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    capsys.readouterr()
    argv = ["chat", "--max-new-tokens", "5", "--device", "cpu", "What is in the picture?"]
    assert main([*argv, "--model", dense_ckpt, "--adapter", os.path.join(dense_run["out"], "adapter")]) == 0
    with_adapter = capsys.readouterr().out
    assert main([*argv, "--model", str(tmp_path / "merged")]) == 0
    assert capsys.readouterr().out == with_adapter


@pytest.mark.slow
def test_fsdp2_tp2_pp2_and_cp2_equal_one_process(dense_run, dense_ckpt, dataset, tmp_path):
    want = losses(dense_run["out"])
    pp = {"pp": 2, "llm_pp_layers": [1, 1], "vit_pp_layers": [2, 0]}
    for name, parallel in (("fsdp2", {"dp_shard": 2}), ("tp2", {"tp": 2}), ("pp2", pp), ("cp2", {"cp": 2})):
        out = tmp_path / name
        torchrun(
            out, config(out, dense_ckpt, dataset, DENSE_LORA, train={"train_iters": 2}, parallel=parallel), 2
        )
        assert_close(losses(out), want, [1, 2])


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(dense_run, dense_ckpt, dataset, tmp_path):
    out = str(tmp_path / "killed")
    raw = config(out, dense_ckpt, dataset, DENSE_LORA)
    proc = launch(out, raw)
    wait_for_step(out, proc, 2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = int(open(os.path.join(out, "checkpoints", "latest")).read().split("_")[1])
    assert killed_at < STEPS
    assert train(from_dict(raw))["steps_run"] == STEPS - killed_at

    def records(path):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(str(path)) if "loss" in r]

    assert records(out) == records(dense_run["out"])


@pytest.mark.slow
def test_qlora_trains_and_fsdp2_shards_nf4_with_one_process_losses(dense_ckpt, dataset, tmp_path):
    lora = {**DENSE_LORA, "base_quant": "nf4"}
    result = run_in_process(
        config(tmp_path / "q", dense_ckpt, dataset, lora, train={"train_iters": 2}), False
    )
    assert any("lora_B" in n and result["params"][n].abs().max() > 0 for n in result["trainable"])
    out = tmp_path / "q_fsdp2"  # NF4 weights sharded by FSDP2 (quantized whole before sharding)
    torchrun(
        out, config(out, dense_ckpt, dataset, lora, train={"train_iters": 2}, parallel={"dp_shard": 2}), 2
    )
    want = losses(tmp_path / "q")
    assert sorted(want) == [1, 2] and all(0 < v < 20 for v in want.values())
    assert_close(losses(out), want, [1, 2])


def test_init_from_loads_a_peft_adapter_and_refuses_another_rank(dense_run, dense_ckpt, dataset, tmp_path):
    adapter = os.path.join(dense_run["out"], "adapter")
    raw = config(tmp_path / "cont", dense_ckpt, dataset, {**DENSE_LORA, "init_from": adapter})
    cfg = from_dict(raw)
    os.makedirs(cfg.output_dir)
    args = load_config(dense_ckpt)
    info = init_distributed(cfg.train.device, cfg.parallel, args)
    try:
        trainer = Trainer(cfg, info, args)
        trainer.build_data()
        trainer.build_model()
        for name in dense_run["trainable"]:  # the adapter the first run ended with, and its merger
            assert torch.equal(trainer.model.get_parameter(name).full_tensor(), dense_run["params"][name]), (
                name
            )
        cfg.lora.rank = 8
        with pytest.raises(ConfigError, match="r=4 lora_alpha=8.0"):
            Trainer(cfg, info, args).build_model()
    finally:
        close_distributed()


def test_a_lora_checkpoint_loads_for_inference_merged(dense_run, tmp_path):
    assert main(["export", str(dense_run["out"]), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    s = build_sample([6, ("image", 4, 4), 9], seed=4)
    with torch.no_grad():
        got = load_model(str(dense_run["out"]))(**ours_kwargs(s)).logits
        want = load_pretrained(str(tmp_path / "merged"))(**ours_kwargs(s)).logits
    assert torch.equal(got, want)


def test_docs_examples_run(dense_run, dense_ckpt):
    doc = open(os.path.join(ROOT, "docs", "lora.md")).read()
    adapter = os.path.join(dense_run["out"], "adapter")
    for block in re.findall(r"```python\n(.*?)```", doc, re.S):
        code = block.replace("ckpt/hf_path/Qwen3-VL-8B-Instruct", dense_ckpt)
        code = code.replace("runs/qwen3vl_8b_lora/adapter", adapter)
        exec(compile(code, "docs/lora.md", "exec"), {})
    for name in ("qwen3vl_8b_lora.yaml", "qwen3vl_30b_a3b_lora.yaml"):
        cfg = load(os.path.join(ROOT, "configs", name), check_paths=False)
        assert cfg.lora.rank > 0
