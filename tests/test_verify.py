"""`vlmtune verify` on tiny checkpoints: PASS for dense, MoE, tied-embedding models and a training checkpoint,
FAIL naming the input kinds when vlmtune's rope is perturbed, TP2 / EP2 on two gloo ranks, the round
trip's tensor comparison, and bad input."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlmtune.models.qwen3_vl.model as qwen_model
from dist_utils import run_ranks
from vlmtune.checkpoint.convert import hf_to_native
from vlmtune.checkpoint.hf import checkpoint_files
from vlmtune.cli import main
from vlmtune.infer.verify_compare import Tolerance, compare_checkpoints, compare_greedy
from vlmtune.infer.verify_inputs import write_media
from vlmtune.testing import make_tiny_checkpoint

SYNTHETIC_KINDS = [
    "text",
    "image",
    "images",
    "video",
    "image+video",
    "padded batch (image, text, video)",
    "packed row (image, text, video)",
]
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[1])


def run_verify(capsys, tmp_path, *args) -> tuple[int, dict | None, str]:
    """(exit code, JSON report or None, stdout) of `vlmtune verify ARGS`, run in this process; stderr (the
    progress bars) is echoed for failing tests."""
    out = tmp_path / "report.json"
    code = main(["verify", *args, "--json", str(out)])
    printed = capsys.readouterr()
    report = json.loads(out.read_text()) if out.exists() else None
    sys.stderr.write(printed.err)
    return code, report, printed.out


def assert_all_pass(code: int, report: dict, printed: str, kinds=SYNTHETIC_KINDS) -> None:
    assert code == 0, printed
    assert [c["kind"] for c in report["checks"]] == kinds
    for c in report["checks"]:
        assert c["passed"] and c["max_abs"] <= 1e-4 and c["loss_diff"] <= 2e-4, c
        if "greedy" in c:
            assert c["greedy"]["agree"] == c["greedy"]["steps"] == 4, c
    assert printed.strip().splitlines()[-1].startswith("verify PASS")


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("verify_moe"))
    make_tiny_checkpoint(d, seed=3, moe=MOE)
    return d


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("verify_tied"))
    make_tiny_checkpoint(d, seed=1, tie_word_embeddings=True)
    return d


def test_dense_passes_with_round_trip(tiny_ckpt, tmp_path, capsys):
    code, report, printed = run_verify(capsys, tmp_path, "--model", tiny_ckpt[0], "--tokens", "4")
    assert_all_pass(code, report, printed)
    rt = report["round_trip"]
    assert rt["passed"] and rt["tensors"] == len(load_file(checkpoint_files(tiny_ckpt[0])[0]))
    # The packed row's logits and loss are the padded batch's: the same three samples, compared alike.
    batch, packed = report["checks"][-2:]
    assert abs(batch["ref_loss"] - packed["ref_loss"]) <= 1e-6


def test_moe_passes_and_round_trip_reads_both_expert_layouts(moe_ckpt, tmp_path, capsys):
    code, report, printed = run_verify(capsys, tmp_path, "--model", moe_ckpt, "--tokens", "4")
    assert_all_pass(code, report, printed)
    # transformers 5 saves experts transposed; our re-save uses the hub layout, compared value by value.
    assert report["round_trip"]["passed"]
    assert any("hub layout" in n for n in report["round_trip"]["notes"])


def test_tied_embeddings_pass(tied_ckpt, tmp_path, capsys):
    code, report, printed = run_verify(capsys, tmp_path, "--model", tied_ckpt, "--tokens", "4")
    assert_all_pass(code, report, printed)
    assert report["round_trip"]["passed"]


def test_training_checkpoint_is_exported_for_transformers(moe_ckpt, tmp_path, capsys):
    run_dir = tmp_path / "run"
    hf_to_native(moe_ckpt, str(run_dir))  # a run directory with checkpoints/latest
    work = tmp_path / "work"
    args = ["--model", str(run_dir), "--tokens", "4", "--work-dir", str(work), "--no-round-trip"]
    code, report, printed = run_verify(capsys, tmp_path, *args)
    assert_all_pass(code, report, printed)
    assert (work / "hf" / "config.json").exists()  # the streamed export transformers loaded


def test_bf16_passes_within_its_bound(tiny_ckpt, tmp_path, capsys):
    args = ["--model", tiny_ckpt[0], "--dtype", "bf16", "--tokens", "4", "--no-round-trip"]
    code, report, printed = run_verify(capsys, tmp_path, *args)
    assert code == 0, printed
    for c in report["checks"]:
        assert c["passed"] and 0 < c["max_abs"] <= c["max_abs_bound"], c


def test_user_samples_pass(tiny_ckpt, tmp_path, capsys):
    media = write_media(str(tmp_path / "media"))
    rows = [
        {
            "messages": [
                {"role": "user", "content": "<image>What is it?"},
                {"role": "assistant", "content": "Stripes."},
            ],
            "images": ["a.png"],
        },  # fmt: skip
        {
            "conversations": [
                {"from": "human", "value": "<video>What moves?"},
                {"from": "gpt", "value": "A square."},
            ],
            "video": "v.mp4",
        },  # fmt: skip
    ]
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "--model",
        tiny_ckpt[0],
        "--data",
        str(data),
        "--dataset-dir",
        media,
        "--tokens",
        "4",
        "--no-round-trip",
    ]
    code, report, printed = run_verify(capsys, tmp_path, *args)
    kinds = [
        "sample 0 (val.jsonl line 1, image)",
        "sample 1 (val.jsonl line 2, video)",
        "padded batch (samples 0-1)",
        "packed row (samples 0-1)",
    ]
    assert_all_pass(code, report, printed, kinds)


def test_perturbed_rope_fails_naming_the_vision_inputs(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """vlmtune's decoder rope with every frequency on the temporal axis (height/width sections lost): text
    positions are equal on all axes and still match; every input with an image or a video fails."""
    rope = qwen_model.text_rope_cos_sin

    def temporal_only(position_ids, head_dim, theta, section, dtype):
        return rope(position_ids, head_dim, theta, [sum(section), 0, 0], dtype)

    monkeypatch.setattr(qwen_model, "text_rope_cos_sin", temporal_only)
    args = ["--model", tiny_ckpt[0], "--tokens", "4", "--no-round-trip"]
    code, report, printed = run_verify(capsys, tmp_path, *args)
    assert code == 1
    verdict = {c["kind"]: c["passed"] for c in report["checks"]}
    assert verdict == {k: k == "text" for k in SYNTHETIC_KINDS}
    for c in report["checks"][1:]:
        assert c["max_abs"] > 10 * c["max_abs_bound"], c
    summary = printed.strip().splitlines()[-1]
    assert summary.startswith("verify FAIL: vs transformers: image, images, video, image+video, padded batch")


def _verify_on_rank(rank, world, model, key, out):
    return main(
        ["verify", "--model", model, "--tokens", "4", "--no-round-trip", f"--parallel.{key}=2", "--json", out]
    )


@pytest.mark.slow
@pytest.mark.parametrize("key", ["tp", "ep"])
def test_parallel_layout_equals_one_process(tiny_ckpt, moe_ckpt, tmp_path, key):
    model = tiny_ckpt[0] if key == "tp" else moe_ckpt
    out = str(tmp_path / "report.json")
    assert run_ranks(_verify_on_rank, 2, model, key, out) == [0, 0]
    with open(out) as f:
        report = json.load(f)
    layout = "tp2 x ep1" if key == "tp" else "tp1 x ep2"
    groups = [c["check"] for c in report["checks"]]
    assert groups == [f"{layout} vs one process"] * 7 + ["vs transformers"] * 7
    for c in report["checks"]:
        assert c["passed"] and c["max_abs"] <= 1e-5, c
        if "greedy" in c:
            assert c["greedy"]["agree"] == 4


def test_round_trip_comparison_finds_a_changed_tensor(tiny_ckpt, tmp_path):
    src = tiny_ckpt[0]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    file = checkpoint_files(str(copy))[0]
    tensors = load_file(file)
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    w = tensors[name]
    w.view(-1)[7] = torch.nextafter(w.view(-1)[7], torch.tensor(1.0))  # one ulp in one element
    save_file(tensors, file, metadata={"format": "pt"})
    assert compare_checkpoints(src, src)["passed"]
    result = compare_checkpoints(src, str(copy))
    assert not result["passed"] and result["mismatches"] == [f"{name}: values differ"]


def test_greedy_difference_is_excused_only_at_a_near_tie():
    logits = torch.zeros(1, 3, 10)
    logits[0, 1, 4], logits[0, 1, 5] = 2.0, 2.0 - 1e-5  # reference picks 4, 5 is a hair behind
    ref = {"tokens": torch.tensor([[1, 4, 4]]), "step_logits": logits}
    near = compare_greedy({"tokens": torch.tensor([[1, 5, 9]])}, ref, tie_bound=2e-4)
    assert near["passed"] and near["agree"] == 1 and len(near["ties"]) == 1
    logits[0, 1, 5] = 1.0
    far = compare_greedy({"tokens": torch.tensor([[1, 5, 9]])}, ref, tie_bound=2e-4)
    assert not far["passed"] and far["agree"] == 1


def test_bf16_bound_scales_with_the_largest_logit():
    ref = torch.tensor([[-3.0, 0.5, 12.0]])  # max |z| 12 is in [8, 16): bf16 ulp 2**-4, 16 ulps = 1.0
    max_abs, mean_abs = Tolerance("bf16").logits(ref)
    assert max_abs == 2.0 ** (3 - 3) and mean_abs == pytest.approx(2**-5 * 15.5 / 3)
    assert Tolerance("fp32").logits(ref) == (1e-4, 1e-4)


def test_missing_model_dir_is_exit_2(tmp_path, capsys):
    code = main(["verify", "--model", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "no such directory" in err


def test_checkpoint_without_tokenizer_is_exit_2(tmp_path, capsys):
    make_tiny_checkpoint(str(tmp_path), seed=0, assets=False)
    code = main(["verify", "--model", str(tmp_path)])
    assert code == 2 and "--processor DIR" in capsys.readouterr().err


def test_parallel_layout_without_torchrun_is_exit_2(tiny_ckpt, capsys):
    code = main(["verify", "--model", tiny_ckpt[0], "--parallel.tp=2"])
    assert code == 2 and "torchrun --nproc_per_node 2" in capsys.readouterr().err


@pytest.mark.parametrize("installed", ["4.57.1", None])
def test_missing_or_old_transformers_is_exit_2(tiny_ckpt, capsys, monkeypatch, installed):
    import transformers

    if installed is None:
        monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    else:
        monkeypatch.setattr(transformers, "__version__", installed)
    code = main(["verify", "--model", tiny_ckpt[0]])
    err = capsys.readouterr().err
    assert code == 2 and "transformers>=5.0" in err
    assert ("not installed" if installed is None else "too old") in err
