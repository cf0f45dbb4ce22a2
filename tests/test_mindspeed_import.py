"""`vlmtune config import-mindspeed`: MindSpeed-MM Qwen3-VL configs (finetune .sh + data/model JSON, and the
single YAML) become vlmtune configs whose every value is checked and named by its source key; nothing is
dropped silently; shell scripts are read as bash would expand them; bad input is an `error:` line with exit
code 2; each imported config trains 2 steps on a tiny model through `vlmtune train`; the docs' worked
example is what the command writes. The round trip of meaning is in test_mindspeed_roundtrip.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_train_utils import make_run_checkpoint
from vlmtune.cli import main
from vlmtune.demo import make_dataset
from vlmtune.errors import ConfigError
from vlmtune.testing import make_tiny_checkpoint
from vlmtune.train.config import load
from vlmtune.train.mindspeed import import_mindspeed
from vlmtune.train.mindspeed_cli import render_yaml
from vlmtune.train.mindspeed_parse import command_words, parse_flags, read_sources, shell_statements

FIXTURES = Path(__file__).parent / "fixtures" / "mindspeed"
ROOT = Path(__file__).parent.parent
SH8, SH30 = "finetune_qwen3vl_8B.sh", "finetune_qwen3vl_30B.sh"
Y8, Y30, LORA = "qwen3vl_full_sft_8B.yaml", "qwen3vl_full_sft_30B.yaml", "qwen3vl_lora_sft_30B.yaml"
CKPT = {"no_load_optim": True, "no_load_rng": True, "no_save_optim": True, "no_save_rng": True}
MEDIA_30B = {"image_min_pixels": 1024, "image_max_pixels": 262144, "video_fps": 2.0, "video_max_frames": 64,
             "video_max_pixels": 16384 * 64}  # fmt: skip


def yaml_30b(out: str, iters: int, gbs: int, lr: float, recompute: str, seq: int, save_interval: int) -> dict:
    return {
        "output_dir": out,
        "model": {"init_from_hf": "./ckpt/hf_path/Qwen3-VL-30B-A3B-Instruct", "activation_checkpointing": recompute},
        "freeze": {"vision_encoder": True, "vision_projector": True, "text_decoder": False},
        "optim": {"lr": lr, "weight_decay": 0.0, "betas": [0.9, 0.999], "clip_grad": 0.0, "schedule": "cosine",
                  "warmup_fraction": 0.1},
        "data": {"dataset": "./data/mllm_format_llava_instruct_data.json", "dataset_dir": "./data",
                 "max_samples": None, "shuffle": True, "cache_dir": "./data/cache_dir", **MEDIA_30B,
                 "cutoff_len": 1024, "train_on_prompt": False, "mask_history": False, "enable_thinking": False,
                 "num_workers": 8},
        "train": {"train_iters": iters, "global_batch_samples": gbs, "micro_batch_tokens": seq, "seed": 42,
                  "mixed_precision": "bf16"},
        "loss": {"type": "microbatch_mean", "chunk_size": 1024, "aux_loss_coef": 0.0},
        "checkpoint": {**CKPT, "save_interval": save_interval},
        "logging": {"log_interval": 1},
        "eval": {"interval": 10000, "max_samples": 5000 * gbs},
        "parallel": {"dp_shard": -1, "ep": 1},
    }  # fmt: skip


EXPECTED = {
    SH8: {
        "output_dir": "save_dir/qwen3vl_8b",
        "model": {"init_from_hf": "./ckpt/hf_path/Qwen3-VL-8B-Instruct", "activation_checkpointing": "full"},
        "freeze": {"vision_encoder": True, "vision_projector": False, "text_decoder": False},
        "optim": {"lr": 5e-06, "weight_decay": 0.01, "betas": [0.9, 0.98], "clip_grad": 0.0, "schedule": "cosine",
                  "warmup_fraction": 0.05, "min_lr": 1e-07},
        "data": {"dataset": "./data/llava_part1.json,./data/llava_part2.json", "dataset_dir": "./data",
                 "max_samples": 2000, "shuffle": True, "cache_dir": "./data/cache_dir", "image_min_pixels": 3136,
                 "image_max_pixels": 802816, "video_fps": 1.0, "video_max_frames": 32,
                 "video_max_pixels": 65536 * 32, "cutoff_len": 1024, "train_on_prompt": False,
                 "mask_history": False, "enable_thinking": False, "num_workers": 4},
        "train": {"train_iters": 3000, "global_batch_samples": 8, "micro_batch_tokens": 2048, "seed": 1234,
                  "mixed_precision": "bf16"},
        "loss": {"type": "token_mean"},
        "checkpoint": {"save_interval": 1000, "no_load_optim": True, "no_load_rng": True},
        "logging": {"log_interval": 5},
        "eval": {"interval": 500, "max_samples": 20 * 8},
        "parallel": {"tp": 1, "pp": 4, "llm_pp_layers": [6, 10, 10, 10], "vit_pp_layers": [27, 0, 0, 0]},
    },
    SH30: {
        "output_dir": "save_dir/qwen3vl_30b",
        "model": {"init_from_hf": "./ckpt/hf_path/Qwen3-VL-30B-A3B-Instruct", "activation_checkpointing": "full"},
        "freeze": {"vision_encoder": True, "vision_projector": True, "text_decoder": False},
        "optim": {"lr": 2e-05, "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-06, "clip_grad": 1.0,
                  "schedule": "linear", "warmup_steps": 40},
        "data": {"dataset": "./mllm_format_llava_instruct_data.json", "dataset_dir": "/home/user/data",
                 "max_samples": None, "shuffle": False, "cache_dir": "/tmp/mm_cache", "image_max_pixels": 1003520,
                 "video_fps": 2.0, "video_max_pixels": 32768 * 128, "cutoff_len": 6144, "train_on_prompt": True,
                 "mask_history": False, "enable_thinking": False, "num_workers": 6},
        "train": {"train_iters": 800, "global_batch_samples": 64, "micro_batch_tokens": 8192, "seed": 7,
                  "mixed_precision": "bf16"},
        "loss": {"type": "sample_mean", "chunk_size": 2048, "aux_loss_coef": 0.001},
        "checkpoint": {**CKPT, "save_interval": 200},
        "logging": {"log_interval": 1},
        "eval": {"interval": 10000},
        "parallel": {"dp_shard": -1, "tp": 1, "pp": 1, "ep": 1},
    },
    Y8: {
        "output_dir": "save_dir/qwen3vl_8b_yaml",
        "model": {"init_from_hf": "./ckpt/hf_path/Qwen3-VL-8B-Instruct"},
        "freeze": {"vision_encoder": False, "vision_projector": False, "text_decoder": True},
        "optim": {"lr": 2e-05, "weight_decay": 0.1, "betas": [0.85, 0.95], "clip_grad": 0.5, "schedule": "constant",
                  "warmup_steps": 100, "min_lr": 2e-06},
        "data": {"dataset": "./data/mllm_format_llava_instruct_data.json", "dataset_dir": "./data",
                 "max_samples": 500, "shuffle": True, "cache_dir": "./data/cache_dir_8b", "image_min_pixels": 4096,
                 "image_max_pixels": 589824, "video_fps": 4.0, "video_max_frames": 48,
                 "video_max_pixels": 16384 * 48, "cutoff_len": 4096, "train_on_prompt": False,
                 "mask_history": True, "enable_thinking": True, "num_workers": 3},
        "train": {"train_iters": 1500, "global_batch_samples": 32, "micro_batch_tokens": 4096, "seed": 2024,
                  "mixed_precision": "bf16"},
        "loss": {"type": "token_mean", "chunk_size": 512},
        "checkpoint": {"save_interval": 500, "no_load_optim": True, "no_load_rng": True, "no_save_optim": False,
                       "no_save_rng": True},
        "logging": {"log_interval": 10},
        "eval": {"interval": 250, "max_samples": 10 * 32},
        "parallel": {"dp_shard": -1, "ep": 1},
    },
    Y30: yaml_30b("save_dir/qwen3vl_30b_yaml", 10000, 16, 1e-05, "selective", 1024, 10000),
    LORA: {
        **yaml_30b("save_dir/qwen3vl_30b_lora", 2000, 8, 1e-04, "full", 2048, 500),
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    },
}  # fmt: skip


def import_files(tmp_path, *files, out="imported.yaml") -> tuple[dict, str]:
    """Run the CLI; return the written config and what it printed."""
    out_path = tmp_path / out
    rc = main(["config", "import-mindspeed", *map(str, files), "--out", str(out_path)])
    assert rc == 0
    return yaml.safe_load(out_path.read_text()), out_path.read_text()


@pytest.mark.parametrize("entry", list(EXPECTED))
def test_fixture_imports_to_the_expected_config(tmp_path, entry):
    cfg, text = import_files(tmp_path, FIXTURES / entry)
    assert cfg == EXPECTED[entry]
    load(str(tmp_path / "imported.yaml"), check_paths=False)
    assert "# Launch: " in text


@pytest.mark.parametrize("entry", list(EXPECTED))
def test_every_written_value_names_its_source_keys(entry):
    cfg, report = import_mindspeed([str(FIXTURES / entry)], "x.yaml")
    lines, section = {}, ""
    for line in render_yaml(cfg, report).splitlines():  # dotted key -> its line
        if re.match(r"^\w+:", line):
            section = line.split(":")[0]
            lines[section] = line
        elif line.startswith("  "):
            lines[f"{section}.{line.split(':')[0].strip()}"] = line
    for m in report.mapped:
        if m.target == "parallel.cp" and m.value == 1:  # the default: not written
            assert "parallel.cp" not in lines
            continue
        comment = lines[m.target].split("  # ", 1)[1]
        assert yaml.safe_load(lines[m.target].split(":", 1)[1]) == (
            cfg[m.target] if "." not in m.target else cfg[m.target.split(".")[0]][m.target.split(".")[1]]
        )
        for s in m.sources:
            assert s.key in comment, (m.target, s.key, comment)


def test_cli_report_lists_every_key_and_ends_with_the_counts(tmp_path, capsys):
    import_files(tmp_path, FIXTURES / SH8)
    out = capsys.readouterr().out.strip().splitlines()
    _, report = import_mindspeed([str(FIXTURES / SH8)])
    n_mapped = len({s.name for m in report.mapped for s in m.sources})
    assert out[-1] == (f"wrote {tmp_path / 'imported.yaml'}: mapped {n_mapped} / ignored {len(report.ignored)} "
                       f"/ unsupported {len(report.unsupported)}")  # fmt: skip
    text = "\n".join(out)
    every = {s.name for m in report.mapped for s in m.sources} | {s.name for s, _ in report.ignored}
    every |= {s.name for s, _ in report.unsupported}
    assert every == set(read_sources([str(FIXTURES / SH8)]).settings)  # nothing is dropped silently
    assert "--lr=5.0e-6 -> optim.lr: 5e-06" in text
    assert "attn_layout=TND: Ascend FlashAttention tensor layout" in text
    assert "--tokenizer-type=NullTokenizer: Megatron tokenizer" in text
    assert "--use-cpu-initialization" not in text  # not in this script
    assert "--load=ckpt/mm_path/Qwen3-VL-8B-Instruct: a MindSpeed-MM checkpoint" in text
    assert "vlmtune convert hf-to-native" in text
    assert "text_decoder.recompute_num_layers=4: vlmtune recomputes" in text
    assert "launch: torchrun --nproc_per_node 8 -m vlmtune.cli train" in text


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit):
        main(["config", "import-mindspeed", "--help"])
    text = capsys.readouterr().out
    for word in ("--out", "--force", "single YAML", "finetune shell script", "data JSON", "model JSON",
                 "micro_batch_size x seq_length", "global_batch_samples", "ignored", "unsupported"):  # fmt: skip
        assert word in text


# ----------------------------------------------------------------------------------------- edits
DELETE, ABSENT = object(), object()
S8, M8, D8, S30, M30, D30, FSDP = (SH8, "model_8B.json", "data_8B.json", SH30, "model_30B.json", "data_30B.json",
                                   "fsdp2_config.yaml")  # fmt: skip
BP, PP = "dataset_param.basic_parameters.", "dataset_param.preprocess_parameters."
YBP = "data." + BP


def apply_edits(tmp_path: Path, edits: list) -> None:
    for name, key, value in edits:
        path = tmp_path / name
        if name.endswith(".sh"):
            text = path.read_text()
            assert key in text, key
            path.write_text(text.replace(key, value, 1))
            continue
        raw = json.loads(path.read_text()) if name.endswith(".json") else yaml.safe_load(path.read_text())
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
        path.write_text(json.dumps(raw) if name.endswith(".json") else yaml.safe_dump(raw))


# -------------------------------------------------------------------------------------- shell scripts
def test_shell_statements_join_continuations_and_drop_comments():
    text = (
        'A=1  # one\nB="x \\\n  y"\n# whole line\nARGS="\n  --p \\  # 说明\n  --q 2 \\\n"\necho "#no" ; C=3'
    )
    assert shell_statements(text) == ["A=1", 'B="x   y"', 'ARGS="\n  --p   --q 2 "', 'echo "#no"', "C=3"]


def test_script_variables_arithmetic_quotes_and_flags(tmp_path):
    script = tmp_path / "run.sh"
    script.write_text(
        '#!/bin/bash\nN=4\nNNODES=2\nW=$(($N*$NNODES))\nTP=2\nDP=$(( W / (TP * 1) ))\nEMPTY=""\n'
        "NAME='my run'\nNAME2=\"$NAME-2\"\nTP=1  # reassigned: later statements see 1\n"
        'ARGS="--a ${DP} --b=$W --flag --list x y --load $EMPTY"\n'
        "torchrun pretrain_vlm.py $ARGS --tp $TP --name \"$NAME2\" --path '$N/x' 2>&1 | tee log_$N\n"
    )
    settings = {n: s.value for n, s in read_sources([str(script)]).settings.items()}
    assert settings == {"launch.NNODES": "2", "args.a": "4", "args.b": "8", "args.flag": True,
                        "args.list": ["x", "y"], "args.load": True, "args.tp": "1", "args.name": "my run-2",
                        "args.path": "$N/x"}  # fmt: skip
    positional, flags = parse_flags(command_words("python x.py cfg.yaml --n 1 > log", {}, "x"))
    assert positional == ["cfg.yaml"] and flags == {"--n": "1"}


def test_script_following_a_yaml_and_explicit_json_files(tmp_path):
    shutil.copy(FIXTURES / Y8, tmp_path / Y8)
    shutil.copy(FIXTURES / FSDP, tmp_path / FSDP)
    launcher = tmp_path / "finetune_qwen3vl_8B.sh"
    launcher.write_text(f"NPUS_PER_NODE=4\nconfig_path=examples/qwen3vl/{Y8}\n"
                        "torchrun --nproc_per_node $NPUS_PER_NODE pretrain_transformers.py ${config_path} \\\n"
                        "    --distributed-backend nccl\n")  # fmt: skip
    cfg, report = import_mindspeed([str(launcher)])
    assert cfg == EXPECTED[Y8] and report.launch.startswith("torchrun --nproc_per_node 4 ")
    alone = tmp_path / "alone"  # the script without its JSON files beside it: they are given as FILEs
    alone.mkdir()
    shutil.copy(FIXTURES / SH8, alone / SH8)
    with pytest.raises(ConfigError, match="--mm-data ./examples/qwen3vl/data_8B.json: no data JSON found"):
        import_mindspeed([str(alone / SH8)])
    cfg, _ = import_mindspeed([str(alone / SH8), str(FIXTURES / D8), str(FIXTURES / M8)])
    assert cfg == EXPECTED[SH8]
    mine = json.loads(
        (FIXTURES / D8).read_text()
    )  # a data JSON given as FILE wins over the one MM_DATA names
    mine["dataset_param"]["basic_parameters"]["dataset"] = "mine.json"
    (tmp_path / "mine.json").write_text(json.dumps(mine))
    cfg, report = import_mindspeed([str(FIXTURES / SH8), str(tmp_path / "mine.json")])
    assert cfg["data"]["dataset"] == "mine.json" and [k for _, k in report.files].count("data JSON") == 1


# ---------------------------------------------------------------------------------------------- errors
ERRORS = [
    ("unknown.yaml", "a: 1\n", "not a MindSpeed-MM Qwen3-VL config"),
    ("bad.json", '{"dataset_param": {', "invalid JSON at line 1"),
    ("bad.yaml", "gpt_args: [1, 2\n", "invalid YAML"),
    ("v1.yaml", "training: {lr: 1}\nfeatures: {}\n", "native-FSDP2 trainer YAML"),
    ("data_only.json", '{"dataset_param": {}}', "no training arguments"),
]


@pytest.mark.parametrize("name,text,message", ERRORS)
def test_unknown_or_malformed_files_exit_2(tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    assert main(["config", "import-mindspeed", str(tmp_path / name), "--out", str(tmp_path / "o.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / name}: ") and message in err
    assert not (tmp_path / "o.yaml").exists()


@pytest.mark.parametrize(
    "edits,message",
    [
        ([(SH8, "--lr 5.0e-6", "--lr fast")], "--lr = 'fast': expected a number; fix the value"),
        ([(SH8, "DP=$(($WORLD_SIZE/$TP/$PP/$CP))", "DP=$(($WORLD_SIZE/0))")], "cannot evaluate $(($WORLD_SIZE/0))"),
        ([(SH8, "--train-iters 3000", "--train-iters 0")],
         "train.train_iters / train.epochs: set exactly one of them to a positive value"),
        ([(SH8, "--lr 5.0e-6", "--lr 0")], "optim.lr: must be positive (from "),
        ([(SH8, "--lr 5.0e-6", "--lr 0")], "finetune_qwen3vl_8B.sh: --lr); fix the source"),
        ([(M8, "text_decoder.pipeline_num_layers", "6,10")], "text_decoder.pipeline_num_layers = '6,10': expected"),
        ([(SH8, "--calculate-per-token-loss", "--calculate-per-token-loss --calculate-per-sample-loss")],
         "--calculate-per-sample-loss together with --calculate-per-token-loss; keep one"),
        ([(SH8, "MBS=1", "MBS=")], "--micro-batch-size = True: expected an integer"),
        ([(M8, "init_from_hf_path", DELETE), (D8, PP + "model_name_or_path", DELETE)], "no Hugging Face checkpoint"),
    ],
)  # fmt: skip
def test_bad_values_name_the_file_and_key(tmp_path, capsys, edits, message):
    shutil.copytree(FIXTURES, tmp_path, dirs_exist_ok=True)
    apply_edits(tmp_path, edits)
    assert main(["config", "import-mindspeed", str(tmp_path / SH8), "--out", str(tmp_path / "o.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_contradicting_files_and_existing_out(tmp_path, capsys):
    shutil.copytree(FIXTURES, tmp_path, dirs_exist_ok=True)
    other = tmp_path / "other_data.json"
    other.write_text((tmp_path / D8).read_text())
    out = tmp_path / "o.yaml"
    files = [str(tmp_path / SH8), str(tmp_path / D8), str(other)]
    assert main(["config", "import-mindspeed", *files, "--out", str(out)]) == 2
    assert "a second data JSON" in capsys.readouterr().err
    out.write_text("keep")
    assert main(["config", "import-mindspeed", str(tmp_path / SH8), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_text() == "keep"
    assert main(["config", "import-mindspeed", str(tmp_path / SH8), "--out", str(out), "--force"]) == 0


def test_unknown_keys_and_values_are_unsupported_with_what_to_do(tmp_path):
    shutil.copytree(FIXTURES, tmp_path, dirs_exist_ok=True)
    apply_edits(tmp_path, [(SH8, "--bf16", "--bf16 --sequence-parallel --my-new-flag 3"),
                           (SH8, "--lr-decay-style cosine", "--lr-decay-style WSD"),
                           (M8, "text_decoder.activation_offload", True),
                           (D8, "dataset_param.attr.role_tag", "from")])  # fmt: skip
    _, report = import_mindspeed([str(tmp_path / SH8)])
    todo = {s.key: text for s, text in report.unsupported}
    assert "no sequence parallelism" in todo["--sequence-parallel"]
    assert "unknown to the importer" in todo["--my-new-flag"]
    assert "choose optim.schedule cosine, linear or constant" in todo["--lr-decay-style"]
    assert "no activation offloading" in todo["text_decoder.activation_offload"]
    assert "convert the dataset" in todo["dataset_param.attr.role_tag"]


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny dense and a tiny MoE checkpoint (real tokenizer) and the demo's VQA data."""
    root = tmp_path_factory.mktemp("mindspeed_tiny")
    dense = make_run_checkpoint(str(root / "dense"))
    make_tiny_checkpoint(str(root / "moe"), seed=0, text_hidden=32, text_layers=2, heads=2, kv_heads=1, head_dim=16,
                         vision_hidden=32, vision_depth=2, deepstack=(0,),
                         moe=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1))  # fmt: skip
    make_dataset(str(root / "data"), n_train=24, n_eval=2, seed=1)
    return {"dense": dense, "moe": str(root / "moe"), "data": str(root / "data")}


@pytest.mark.parametrize("entry", [SH8, SH30, Y8, Y30, LORA])
def test_imported_config_trains_two_steps(tmp_path, tiny, entry):
    cfg, _ = import_files(tmp_path, FIXTURES / entry)
    model = tiny["moe" if "30B" in entry else "dense"]
    overrides = [  # paths and parallel sizes of this machine; 2 cheap steps
        f"--output_dir={tmp_path / 'run'}", f"--model.init_from_hf={model}", "--data.dataset=train.json",
        f"--data.dataset_dir={tiny['data']}", f"--data.cache_dir={tmp_path / 'cache'}", "--data.num_workers=0",
        "--train.train_iters=2",
        "--parallel.tp=1", "--parallel.pp=1", "--parallel.ep=1", "--parallel.dp_shard=-1",
        "--parallel.llm_pp_layers=[]", "--parallel.vit_pp_layers=[]",
        "--checkpoint.save_hf=false", "--logging.tensorboard=false", "--logging.progress_bar=false",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "vlmtune.cli", "train", str(tmp_path / "imported.yaml"), *overrides],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"done: step 2, loss \d", res.stdout), res.stdout
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert steps[-1]["step"] == 2 and all(m["loss"] > 0 for m in steps)  # logged every log_interval steps
    assert cfg["train"]["train_iters"] > 2  # the imported value, overridden for the test only


def test_docs_worked_example_is_what_the_command_writes_and_prints(monkeypatch, capsys, tmp_path):
    doc = (ROOT / "docs" / "migrating-from-mindspeed.md").read_text()
    command = "vlmtune config import-mindspeed tests/fixtures/mindspeed/finetune_qwen3vl_8B.sh --out qwen3vl_8b.yaml"
    assert f"```bash\n{command}\n```" in doc
    monkeypatch.chdir(ROOT)  # the example runs from the repository root
    cfg, report = import_mindspeed(["tests/fixtures/mindspeed/finetune_qwen3vl_8B.sh"], "qwen3vl_8b.yaml")
    written = re.search(r"```yaml\n(.*?)```", doc, re.S).group(1)
    assert written == render_yaml(cfg, report)
    out = tmp_path / "qwen3vl_8b.yaml"
    assert (
        main(
            [
                "config",
                "import-mindspeed",
                "tests/fixtures/mindspeed/finetune_qwen3vl_8B.sh",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out.replace(str(out), "qwen3vl_8b.yaml")
    shown = re.search(r"prints the report \(abbreviated here\):\n\n```\n(.*?)```", doc, re.S).group(1)
    for line in shown.splitlines():
        assert line.strip() == "..." or line in printed.splitlines(), line
