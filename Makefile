# One-command set-up from a fresh clone: `make demo` runs the main demo, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck unit bench bench-gpu study study-llm clean

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, from the pin: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet -c constraints-dev.txt torch
	$(BIN)/python -m pip install --quiet -c constraints-dev.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/digits_demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest

test: lint typecheck unit

# The development lane: no multi-process jobs, no long end-to-end runs (about a minute).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not distributed"

# The paper reproduction of docs/reproduction.md (about 4 minutes with 2 processes).
study: $(STAMP)
	$(BIN)/python -m studies.reproduction --out docs --jobs 2

# The QK-norm decoder LLM with Muon + AdamW of docs/llm.md (two runs of 400 steps, about 2 CPU-minutes).
study-llm: $(STAMP)
	$(BIN)/python -m studies.llm --out docs

# Overhead of the monitor on a CPU ResNet-18 (vs no monitor and wandb.watch), then the cost of one
# measurement against model size and number of tensors. About 40 minutes on 2 CPU cores.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_overhead.py --lightning
	$(BIN)/python benchmarks/bench_scaling.py
	$(BIN)/python benchmarks/bench_peers.py

# On a machine with a CUDA device (with a CUDA build of torch installed in the venv).
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache lightning_logs
