# The README's two commands: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2:135m
PROMPT ?= Why is the sky blue? Answer in two sentences.

# ggml-python builds ggml from source: with llamafile's matmul kernels (off in its default
# build; prompts are ~1.3x slower without them) and the vector extensions this CPU has,
# named one by one (scripts/cpu_cmake_args.py says why not -march=native: slower decode,
# and AMX kernels that crash on VMs). llama-cpp-python (benchmark peer, goldens) gets the
# same flags, so both run the same kernels.
CPU_CMAKE_ARGS := $(shell $(PY) scripts/cpu_cmake_args.py)
GGML_CMAKE_ARGS ?= $(CPU_CMAKE_ARGS) -DGGML_LLAMAFILE=ON
LLAMA_CMAKE_ARGS ?= $(CPU_CMAKE_ARGS)

.PHONY: run test install install-test lint bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Built here, never taken from pip's wheel cache: a cached wheel may have been built with
# other flags (and herd's ggml results are bit-identical to llama.cpp's only with these).
GGML_INSTALL = $(BIN)/python -c "import ggml" 2>/dev/null || \
	CMAKE_ARGS="$(GGML_CMAKE_ARGS)" $(BIN)/python -m pip install -q --no-cache-dir ggml-python==0.0.45

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(GGML_INSTALL)

install-test: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	$(GGML_INSTALL)

run: install
	$(BIN)/herd run $(MODEL) "$(PROMPT)"

test: install-test
	@# registry tests need Debian's docker-registry; install it when we can (root)
	@if [ "$$(id -u)" = 0 ] && ! command -v docker-registry >/dev/null; then \
		(apt-get update -q && apt-get install -y -q docker-registry) >/dev/null || true; fi
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check src tests benchmarks scripts

bench: install-test
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.compare
