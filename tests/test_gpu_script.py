"""`benchmarks/gpu.py --dry-run` starts from the source tree alone, as on the GPU machine (no network, nothing
installed): `python -S` skips site-packages' .pth files, so the editable install of vlmtune is invisible and
only `src/` (on PYTHONPATH, as the script's usage line puts it) can provide it. Every section must run."""

from __future__ import annotations

import json
import math
import os
import site
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_script_dry_run_from_the_source_tree(tmp_path):
    out = tmp_path / "out"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "src"), *site.getsitepackages()]),
        "PYTHONNOUSERSITE": "1",
        "OMP_NUM_THREADS": "2",
    }
    cmd = [sys.executable, "-S", "benchmarks/gpu.py", "--dry-run", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = json.loads((out / "gpu_report.json").read_text())
    assert report["environment"]["vlmtune"] == os.path.join(ROOT, "src", "vlmtune")
    sections = report["sections"]
    assert list(sections) == ["pytest", "varlen", "grouped_gemm", "syncs", "nccl_steps", "throughput",
                              "context_parallel", "lora"]  # fmt: skip
    assert all(s["status"] == "ok" for s in sections.values()), {
        k: s.get("error") for k, s in sections.items()
    }
    assert "tests collected" in sections["pytest"]["summary"]  # every gpu test module imports
    for shape in ("decoder", "vision"):
        assert max(sections["varlen"][shape]["rel_err"].values()) <= 1e-5
    assert sections["grouped_gemm"]["empty_experts"] == 2
    assert max(sections["grouped_gemm"]["rel_err"].values()) <= 1e-2
    assert sections["nccl_steps"]["backend"] == "gloo" and all(
        map(math.isfinite, sections["nccl_steps"]["losses"])
    )
    for kind in ("toy", "toy-moe"):
        for side in ("vlmtune", "transformers"):
            assert sections["throughput"][kind][side]["tokens_per_s"] > 0, sections["throughput"][kind][side]
    assert "## throughput: ok" in (out / "gpu_report.md").read_text()
    cp = sections["context_parallel"]["cp"]
    assert list(cp) == ["1", "2"] and cp["2"]["saved_vs_one_rank"] < 0.6  # activations per rank ~ 1/cp
    modes = sections["lora"]["modes"]  # full fine-tuning vs adapters: fewer trainable weights, less state
    assert modes["lora"]["trainable"] < modes["full"]["trainable"] / 10
    assert modes["lora"]["state"]["optimizer"] < modes["full"]["state"]["optimizer"] / 10
    for mode in modes.values():  # `vlmtune plan`'s state bytes for the same run, exactly
        assert (mode["plan"]["params"], mode["plan"]["optimizer"]) == (
            mode["state"]["params"],
            mode["state"]["optimizer"],
        )
    assert "## lora: ok" in (out / "gpu_report.md").read_text()
