# The README's two commands: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2:135m
PROMPT ?= Why is the sky blue? Answer in two sentences.

# ggml-python builds ggml from source, here with the ggml that llama.cpp ships (the one
# llama-cpp-python 0.3.36 vendors: same kernels as the benchmark peer and the goldens;
# scripts/build_ggml.py says why), llamafile's matmul kernels, and the vector extensions
# this CPU has, named one by one (scripts/cpu_cmake_args.py says why not -march=native:
# slower decode, and AMX kernels that crash on VMs). llama-cpp-python gets the same flags.
# GGML_RPC: layers on other machines' rpc-servers (HERD_RPC, `herd rpc-server`).
CPU_CMAKE_ARGS := $(shell $(PY) scripts/cpu_cmake_args.py)
GGML_CMAKE_ARGS ?= $(CPU_CMAKE_ARGS) -DGGML_LLAMAFILE=ON -DGGML_RPC=ON
LLAMA_CMAKE_ARGS ?= $(CPU_CMAKE_ARGS)

.PHONY: run test install install-test lint bench fuzz llama-server

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Built here (cached in ~/.cache/herd by version and flags), never from pip's wheel cache.
GGML_INSTALL = $(BIN)/python scripts/build_ggml.py --cmake-args "$(GGML_CMAKE_ARGS)"

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(GGML_INSTALL)

install-test: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test,mlx,onnx,ray]"
	$(GGML_INSTALL)

run: install
	$(BIN)/herd run $(MODEL) "$(PROMPT)"

test: install-test
	@# registry tests need Debian's docker-registry; install it when we can (root)
	@if [ "$$(id -u)" = 0 ] && ! command -v docker-registry >/dev/null; then \
		(apt-get update -q && apt-get install -y -q docker-registry) >/dev/null || true; fi
	$(BIN)/python -m pytest -q

# The same checks run in `make test` (tests/unit/test_style.py), so CI enforces them too.
LINT_PATHS := src tests benchmarks scripts

lint: install-test
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

bench: install-test
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q -e ".[bench,mlx,onnx]"
	$(BIN)/python -m benchmarks.compare

# The serving benchmark's anchor: llama.cpp's llama-server from the same llama.cpp source and
# CPU flags as herd's ggml (cached in ~/.cache/herd/llama-server; prints the binary's path).
# Then: $(BIN)/python -m benchmarks.serving --peer llama-server
llama-server: $(BIN)/python
	$(BIN)/python scripts/build_llama_server.py --cmake-args "$(GGML_CMAKE_ARGS)"

# The long fuzz and fault runs behind the README's "Reliability" figures (about 20 minutes
# on 2 cores); `make test` runs bounded versions of the same properties in seconds. Each
# script prints its seed; SEED=N reruns the same mutants and requests.
SEED ?= 22
fuzz: install-test
	$(BIN)/python scripts/fuzz_gguf.py --mutants 10000 --seed $(SEED)
	$(BIN)/python scripts/fuzz_http.py --requests 5000 --seed $(SEED)
	$(BIN)/python scripts/load_faults.py --clients 32 --seconds 150 --seed $(SEED)
