# latentdiff — `make help` lists the targets. Every target installs what it needs first (uv + .venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# uv from PATH, else a private copy bootstrapped with pip into .tools/
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
export UV_PYTHON_DOWNLOADS := never
ARGS ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= auto

.DEFAULT_GOAL := help
.PHONY: help install train extract sample evaluate export verify test test-fast test-integration test-e2e bench bench-gpu \
	lint format clean

help: ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-17s\033[0m %s\n", $$1, $$2}'
	@echo "  Pass options with ARGS=\"...\" (train, extract, sample, evaluate, export) or PYTEST_ARGS=\"...\" (test, test-fast, test-integration, test-e2e), e.g. make train ARGS=\"model=unet_tiny\""

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet uv

$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --compile-bytecode --python $(PYTHON)
	@touch $@

install: $(VENV)/.installed ## Install the package and its locked dependencies into .venv (uv)

train: install ## Train the default experiment (quickstart: U-ViT-tiny on built-in shapes, CPU, ~5 min with AVX512-BF16, ~10 without)
	$(PY) train.py $(ARGS)

extract: install ## Encode images into a latent store: make extract ARGS="data=imagenet_folder data.root=... out=..."
	$(PY) -m latentdiff.extract $(ARGS)

export: install ## Export a checkpoint's backbone: make export ARGS="ckpt=outputs/<name>/<run>/last.ckpt out=<dir>"
	$(PY) -m latentdiff.export $(ARGS)

verify: install ## Recompute checksums: make verify ARGS="path=<run dir | checkpoint | latent store>"
	$(PY) -m latentdiff.verify $(ARGS)

sample: install ## Generate images: make sample ARGS="ckpt=outputs/.../last.ckpt num_samples=50000"
	$(PY) sample.py $(ARGS)

evaluate: install ## Score samples: make evaluate ARGS="samples=.../samples.npz reference=... metrics=[fid,isc]"
	$(PY) evaluate.py $(ARGS)

test: install ## Run every tier (CPU, offline), one pytest-xdist worker per core; TEST_WORKERS=0 runs them in one process
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests/unit tests/integration tests/e2e $(PYTEST_ARGS)

test-fast: install ## Run the unit tier (tests/unit: no training, no subprocess; under 2 minutes)
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: install ## Run the integration tier (tests/integration: jobs run in-process)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests/integration $(PYTEST_ARGS)

test-e2e: install ## Run the e2e tier (tests/e2e: the README's commands in subprocesses)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests/e2e $(PYTEST_ARGS)

bench: install ## Benchmarks (bench/): tables + JSON under outputs/bench/; OFFICIAL_UVIT=<U-ViT checkout> adds the side-by-side
	$(PY) bench/train.py
	OFFICIAL_UVIT="$(OFFICIAL_UVIT)" $(PY) bench/official.py
	$(PY) bench/loader.py
	$(PY) bench/sampling.py
	$(PY) bench/integrity.py

bench-gpu: install ## The GPU runbook (README): U-ViT-S/2, L/2, H/2 img/s and MFU at batch 128/256, bf16, eager vs compiled
	$(PY) bench/train.py --device cuda --data latents --models uvit_s2,uvit_l2,uvit_h2 --batch 128,256 \
		--precision bf16 --compile eager,model --steps 30 --warmup 10 --out outputs/bench/train_gpu.json
	$(PY) bench/train.py --device cuda --data latents --models uvit_s2,uvit_l2,uvit_h2 --batch 128 \
		--precision bf16 --compile eager,model --steps 30 --warmup 10 --no-options --no-components \
		--out outputs/bench/train_gpu_no_checkpointing.json model.use_checkpoint=false
	OFFICIAL_UVIT="$(OFFICIAL_UVIT)" $(PY) bench/official.py --device cuda --out outputs/bench/official_gpu.json

lint: install ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## Remove .venv, .tools, caches (keeps outputs/)
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache
