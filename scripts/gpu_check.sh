#!/usr/bin/env bash
# The ggml backend on a CUDA GPU, offline: build ggml-python (and llama-cpp-python) with
# CUDA, run the op and conformance tests and SmolLM2 against the llama.cpp goldens with
# layers offloaded, then benchmark herd-ggml against llama.cpp, both offloaded.
#
#   scripts/gpu_check.sh [all|build|test|smollm2|bench]        (default: all)
#
# build: both libraries; test: ops, conformance, SmolLM2 goldens; smollm2: the SmolLM2
# goldens and the benchmark (for a model carried after the first call); bench: the
# benchmark. Every stage builds what it needs first, unless built already.
#
# Needs under .whl/ (ignored by git): ggml_python-0.0.45.tar.gz,
# llama_cpp_python-0.3.36.tar.gz, gguf-0.19.0-py3-none-any.whl (any other *.whl there is
# installed too) and smollm2.gguf, or its parts smollm2.gguf.part* (joined in version order).
# Builds go to build/gpu/ (ignored, kept between calls on a warm machine, and resumed
# there: a build cut short continues where it stopped). Logs go to $OUT (default
# build/gpu/out), with summary.txt listing every step, its exit status and seconds.
# A failing step never stops the others.
#
# Environment: PYTHON (default python3), JOBS (default nproc), BENCH_THREADS (8), BENCH_RUNS
# (3), HERD_TEST_NUM_GPU (-1: every layer that fits), GPU_CHECK_DEADLINE (seconds for the
# whole run, default 540: steps are cut to what is left, an unfinished llama-cpp-python
# build is stopped in time for the benchmark and resumed by the next call),
# GPU_CHECK_DRY=1 (no CUDA: the same steps with CPU-only build flags and no llama-cpp-python
# build, to try the script on a machine without a GPU).
set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
STAGE=${1:-all}
PY=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
DEADLINE=${GPU_CHECK_DEADLINE:-540}
DRY=${GPU_CHECK_DRY:-0}
W=$ROOT/build/gpu
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
T0=$(date +%s)
SUMMARY=$OUT/summary.txt

elapsed() { echo $(($(date +%s) - T0)); }
note() { echo "[$(elapsed)s] $*" | tee -a "$SUMMARY"; }

# step NAME TIMEOUT CMD...: run a command or function of this script with a time limit (cut
# to what is left before the deadline), log to $OUT/NAME.log and the console (QUIET=1: the
# log only, its tail on failure), record the exit status in the summary
step() {
    local name=$1 limit=$2 start rc left log=$OUT/$1.log
    shift 2
    left=$((DEADLINE - $(elapsed) - 15))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        note "$name: skipped, no time left before the deadline"
        return 125
    fi
    start=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" >"$log"
    if [ "${QUIET:-0}" = 1 ]; then
        timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >>"$log" 2>&1
        rc=$?
        [ "$rc" = 0 ] || tail -n 40 "$log"
    else
        timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$log"
        rc=${PIPESTATUS[0]}
    fi
    if [ "$(stat -c %s "$log")" -gt 4000000 ]; then # keep what comes back small
        { head -n 100 "$log"; echo "[... cut ...]"; tail -n 1500 "$log"; } >"$log.cut"
        mv "$log.cut" "$log"
    fi
    note "$name: exit $rc in $(($(date +%s) - start))s$([ "$rc" = 124 ] && echo ' (timed out)')"
    return "$rc"
}

if [ "$DRY" = 1 ]; then
    CUDA_ARGS=""
else
    CUDA_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90"
fi
GGML_ARGS="$CUDA_ARGS -DGGML_LLAMAFILE=ON $($PY scripts/cpu_cmake_args.py) ${GGML_EXTRA_ARGS:-}"
# llama.cpp without its flash-attention CUDA kernels: half the build time, which a 15-minute
# device lease needs; the benchmark then runs llama.cpp with flash_attn=False
LLAMA_ARGS="$CUDA_ARGS $($PY scripts/cpu_cmake_args.py) -DLLAVA_BUILD=OFF -DGGML_CUDA_FA=OFF"
export BENCH_LLAMA_FLASH_ATTN=0
export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS MAKEFLAGS=-j$JOBS
if command -v nvcc >/dev/null && [ "$DRY" != 1 ]; then
    CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
    export CUDA_HOME  # no LD_LIBRARY_PATH: torch (in the same test process) brings its own
fi
# ggml first, then the extra wheels, then herd and the benchmarks from this checkout
export PYTHONPATH=$W/ggml:$W/llama:$W/site:$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}
MODEL=$W/smollm2.gguf
export HERD_TEST_NUM_GPU=${HERD_TEST_NUM_GPU:--1} HERD_CACHE=$W/cache HERD_TEST_SMOLLM2=$MODEL
export SMOLLM2_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
export ROOT STAGE PY JOBS DEADLINE DRY W OUT T0 SUMMARY MODEL

environment() {
    note "stage $STAGE, dry=$DRY, jobs=$JOBS, python: $($PY -V 2>&1)"
    nvidia-smi 2>&1 | head -15
    nvcc --version 2>&1 | tail -2
    cmake --version 2>&1 | head -1
    nproc
    free -g
    $PY - <<'EOF'
import importlib
for m in ["numpy", "regex", "jinja2", "yaml", "tqdm", "psutil", "sentencepiece", "tokenizers",
          "torch", "transformers", "accelerate", "pytest", "scikit_build_core", "diskcache"]:
    try:
        mod = importlib.import_module(m)
        print(f"{m:18} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # report, do not stop
        print(f"{m:18} MISSING ({type(e).__name__}: {e})")
EOF
}

prepare() {
    # wheels (gguf, anything else carried) and a stand-in for llama-cpp-python's diskcache
    mkdir -p "$W/site"
    ls .whl/*.whl >/dev/null 2>&1 &&
        $PY -m pip install -q --no-deps --no-index --upgrade --target "$W/site" .whl/*.whl
    if ! $PY -c "import diskcache" 2>/dev/null; then
        printf '%s\n' '"""Stand-in: llama_cpp imports diskcache; the benchmark never uses it."""' \
            'class Cache:' '    def __init__(self, *a, **k):' \
            '        raise RuntimeError("diskcache is not installed")' >"$W/site/diskcache.py"
    fi
    if [ ! -s "$MODEL" ] && [ -f .whl/smollm2-meta.json ] && ! ls .whl/smollm2.gguf* >/dev/null 2>&1; then
        # the real file cannot travel with the sdists (64 MiB): SmolLM2's layout, random weights
        $PY scripts/clone_gguf.py build .whl/smollm2-meta.json "$MODEL" &&
            touch "$W/clone" && echo "SmolLM2: random-weight clone (timings only)"
        return 0
    fi
    if [ ! -s "$MODEL" ]; then
        if [ -f .whl/smollm2.gguf ]; then
            cp .whl/smollm2.gguf "$MODEL"
        elif ls .whl/smollm2.gguf.part* >/dev/null 2>&1; then
            ls .whl/smollm2.gguf.part* | sort -V | xargs cat >"$MODEL"
        fi
    fi
    if [ -s "$MODEL" ]; then
        [ "$(sha256sum "$MODEL" | cut -d' ' -f1)" = "$SMOLLM2_SHA" ] &&
            echo "SmolLM2: $MODEL (sha256 ok)" || echo "SmolLM2: $MODEL: WRONG sha256"
    else
        echo "SmolLM2: missing (.whl/smollm2.gguf or .whl/smollm2.gguf.part*)"
        return 1
    fi
}

# build NAME SDIST CMAKE_ARGS: an sdist unpacked once, built in a fixed directory (so an
# interrupted build resumes), installed to $W/NAME; $W/NAME.ok holds the flags it succeeded with
build() {
    local name=$1 sdist=$2 args=$3 src
    [ "$(cat "$W/$name.ok" 2>/dev/null)" = "$args" ] && { echo "$name: built already"; return 0; }
    [ -f "$sdist" ] || { echo "$name: $sdist missing"; return 1; }
    src=$W/src/$(basename "$sdist" .tar.gz)
    [ -d "$src" ] || { mkdir -p "$W/src" && tar -xzf "$sdist" -C "$W/src"; }
    if [ "$name" = ggml ] && [ ! -f "$src/vendor/ggml.llama" ]; then
        # as scripts/build_ggml.py: ggml-python with the ggml llama.cpp ships
        tar -xzf .whl/llama_cpp_python-0.3.36.tar.gz -C "$W/src" \
            llama_cpp_python-0.3.36/vendor/llama.cpp/ggml &&
            rm -rf "$src/vendor/ggml" &&
            mv "$W/src/llama_cpp_python-0.3.36/vendor/llama.cpp/ggml" "$src/vendor/ggml" &&
            touch "$src/vendor/ggml.llama"
    fi
    rm -rf "${W:?}/$name"
    # resume only a build made with the same flags (CMake keeps cached options)
    [ "$(cat "$W/$name.args" 2>/dev/null)" = "$args" ] || rm -rf "${W:?}/$name-build"
    echo "$args" >"$W/$name.args"
    CMAKE_ARGS="$args" $PY -m pip install -v --no-build-isolation --no-deps --no-index \
        --target "$W/$name" --config-settings=build-dir="$W/$name-build" "$src" &&
        echo "$args" >"$W/$name.ok"
}

gpu_status() {
    $PY - "$MODEL" <<'EOF'
import os, sys, time
from herd.ml.backends.ggml.devices import probe_devices
import herd.ml.backends.ggml._lib as L

for d in probe_devices():
    print(f"device: {d.info.kind:5} {d.info.name}: {d.info.free_memory / 2**30:.1f} of "
          f"{d.info.total_memory / 2**30:.1f} GiB free")
print("ggml libraries:", L._LIB_DIR, [p._name.rsplit("/", 1)[-1] for p in L._LIBS])
if not any(d.info.kind in ("gpu", "igpu") for d in probe_devices()):
    print("NO GPU: this ggml has none, so every test below ran on the CPU")
if not os.path.exists(sys.argv[1]):
    sys.exit(0)
import herd

llm = herd.load(sys.argv[1], backend="ggml")
b = llm.backend
print("layers on GPU:", sum(d is not None for d in b.plan.layers), "of", len(b.plan.layers),
      "| flash attention:", b.flash_attention, "| GPUs in use:", [g.device.info.name for g in b.gpus])
for need in b.plan.needs:
    print(f"  plan {need.name}: weights {need.weights >> 20} MiB, KV {need.cache >> 20} MiB, "
          f"compute {need.graph >> 20} MiB, free {need.free >> 20} MiB")
t = time.perf_counter()
out = llm.generate("The capital of France is", raw=True, options={"temperature": 0, "num_predict": 64})
print(f"64 greedy tokens in {time.perf_counter() - t:.2f}s: {out['response']!r}")
EOF
}
export -f elapsed note environment prepare build gpu_status

# stages: what each runs (the builds are skipped when done, resumed when cut short)
case $STAGE in
    all) WANT="llama ops smollm2 bench" ;;
    build) WANT="llama" ;;
    test) WANT="ops smollm2" ;;
    smollm2) WANT="llama smollm2 bench" ;;
    bench) WANT="llama bench" ;;
    *) echo "usage: $0 [all|build|test|smollm2|bench]" && exit 2 ;;
esac
wants() { [[ " $WANT " == *" $1 "* ]]; }
have_model() { [ -s "$MODEL" ] || { note "$1: skipped, no SmolLM2 (.whl/smollm2.gguf*)"; false; }; }

step environment 60 environment
step prepare 120 prepare
export CUDA_ARGS GGML_ARGS LLAMA_ARGS
LLAMA_PID=
if wants llama && [ "$DRY" = 1 ]; then
    note "dry run: llama-cpp-python not built (the installed one is used if any)"
elif wants llama; then
    # in the background and niced: the ggml build the tests need goes first
    (
        renice -n 10 -p $BASHPID >/dev/null
        QUIET=1 step build_llama_cpp 3000 build llama .whl/llama_cpp_python-0.3.36.tar.gz \
            "$LLAMA_ARGS"
    ) >/dev/null 2>&1 &
    LLAMA_PID=$!
fi
QUIET=1 step build_ggml 3000 build ggml .whl/ggml_python-0.0.45.tar.gz "$GGML_ARGS"
step gpu_status 120 gpu_status
if wants ops; then
    step test_ops_conformance 240 "$PY" -m pytest -q -ra -p no:cacheprovider \
        tests/unit/test_ops.py tests/unit/test_devices.py tests/conformance
fi
if wants smollm2 && have_model smollm2_goldens && [ ! -f "$W/clone" ]; then
    step smollm2_goldens 180 "$PY" -m pytest -q -ra -p no:cacheprovider \
        tests/integration/test_real_models.py -k smollm2
fi
if [ -n "$LLAMA_PID" ]; then
    reserve=20
    wants bench && [ -s "$MODEL" ] && reserve=150 # time for the benchmark
    while kill -0 "$LLAMA_PID" 2>/dev/null && [ "$(elapsed)" -lt $((DEADLINE - reserve)) ]; do
        sleep 5
    done
    if kill -0 "$LLAMA_PID" 2>/dev/null; then
        note "llama-cpp-python still building: stopped (rerun '$0 bench' to resume it)"
        pkill -TERM -P "$LLAMA_PID" 2>/dev/null # its timeout, which stops the whole build
    fi
    wait "$LLAMA_PID" 2>/dev/null
fi
if wants bench && have_model bench_gpu; then
    engines=herd-ggml,llama.cpp
    if ! $PY -c "import llama_cpp" >/dev/null 2>&1; then
        note "llama-cpp-python not importable: benchmarking herd-ggml alone"
        engines=herd-ggml
    fi
    step bench_gpu 240 "$PY" -m benchmarks.compare --model "$MODEL" --engines "$engines" \
        --num-gpu -1 --threads "${BENCH_THREADS:-8}" --runs "${BENCH_RUNS:-3}" \
        --json "$OUT/bench_gpu.json"
fi
for log in build_ggml build_llama_cpp; do # the compiler's errors, if any, at a glance
    [ -f "$OUT/$log.log" ] && grep -m5 -E "error:|FAILED:|CMake Error|ERROR" "$OUT/$log.log" |
        cut -c1-300 | sed "s/^/$log: /"
done
note "done"
cat "$SUMMARY"
