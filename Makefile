# The README's two commands: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2:135m
PROMPT ?= Why is the sky blue? Answer in two sentences.

.PHONY: run test install install-test lint goldens bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"

run: install
	$(BIN)/herd run $(MODEL) "$(PROMPT)"

test: install-test
	@# registry tests need Debian's docker-registry; install it when we can (root)
	@if [ "$$(id -u)" = 0 ] && ! command -v docker-registry >/dev/null; then \
		(apt-get update -q && apt-get install -y -q docker-registry) >/dev/null || true; fi
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check src tests benchmarks scripts
