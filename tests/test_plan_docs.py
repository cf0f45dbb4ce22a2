"""docs/plan.md's worked examples run as written: every ```bash block that runs `vlmtune plan` is run (with the
published config.json values of tests/test_flops.py in place of the `hf download`) and its output must be the
block that follows it, character for character."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from test_flops import QWEN3_VL_8B, QWEN3_VL_30B_A3B

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"Qwen3-VL-8B-Instruct": QWEN3_VL_8B, "Qwen3-VL-30B-A3B-Instruct": QWEN3_VL_30B_A3B}


def examples(path: str) -> list[tuple[str, str]]:
    """(bash block, the output block after it) for each block of `path` that runs `vlmtune plan`."""
    blocks = re.findall(r"```(\w*)\n(.*?)```", open(path).read(), flags=re.S)
    return [
        (code, blocks[i + 1][1])
        for i, (lang, code) in enumerate(blocks[:-1])
        if lang == "bash" and "vlmtune plan " in code and blocks[i + 1][0] == ""
    ]


def run_as_written(code: str, models: str) -> str:
    """The block in bash from the repository root, `vlmtune` being this checkout's CLI; instead of
    downloading config.json, each config's `model.init_from_hf` points at the published values in `models`."""

    def plan(m: re.Match) -> str:
        config = open(os.path.join(ROOT, m.group(1))).read()
        name = re.search(r"init_from_hf: ckpt/hf_path/(\S+)", config).group(1)
        return f"{sys.executable} -m vlmtune.cli plan {m.group(1)} --model.init_from_hf={models}/{name}"

    script = "\n".join(
        "" if line.startswith("hf download ") else re.sub(r"vlmtune plan (configs/\S+)", plan, line)
        for line in code.splitlines()
    )
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    out = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("index", range(len(examples(os.path.join(ROOT, "docs", "plan.md")))))
def test_plan_docs_examples_run_as_written(tmp_path, index):
    for name, config in CONFIGS.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    code, output = examples(os.path.join(ROOT, "docs", "plan.md"))[index]
    assert run_as_written(code, str(tmp_path)) == output
