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

.PHONY: help setup system-deps run test lint format schema clean

help:
	@echo "make run     Redis, gateway and a worker (tokenbus up)"
	@echo "make test    ruff, mypy --strict, pytest"
	@echo "make setup   .venv with the project and its dev tools; redis-server, docker-compose"
	@echo "make lint    ruff check, ruff format --check, mypy"
	@echo "make format  ruff format, ruff check --fix"
	@echo "make schema  regenerate schema/job.v1.json"
	@echo "make clean   remove .venv and caches"

setup: $(STAMP) system-deps

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
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

run: setup
	$(BIN)/tokenbus up

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# pytest's exit code 5 (no tests collected) fails the run like any other: we always have tests.
test: lint
	@$(BIN)/pytest -q || { rc=$$?; \
		[ $$rc -ne 5 ] || echo "pytest collected no tests: that is a failure here"; exit $$rc; }

schema: setup
	$(BIN)/tokenbus schema

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
