# The README's two commands: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2:135m
PROMPT ?= Why is the sky blue? Answer in two sentences.

# ggml-python builds ggml from source: with llamafile's matmul kernels (off in its default
# build; prompts are ~1.3x slower without them) for this machine's CPU.
GGML_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DGGML_LLAMAFILE=ON
# llama-cpp-python (benchmark peer and goldens): a native build enables AMX kernels that
# crash on VMs whose CPUs report AMX; name the vector extensions instead.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON \
	-DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_BMI2=ON

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
