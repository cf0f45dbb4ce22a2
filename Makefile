# `make demo`: install vlmtune and fine-tune a tiny Qwen3-VL on synthetic visual questions (CPU, minutes).
PYTHON ?= python3
OUT ?= demo_out
STEPS ?= 250

.PHONY: install demo test lint

install:
	$(PYTHON) -m pip install -e ".[dev]"

demo: install
	vlmtune demo --out $(OUT) --steps $(STEPS)

test:
	$(PYTHON) -m pytest -q

lint:
	ruff check . && ruff format --check .
