"""Build llama.cpp's `llama-server`, the serving benchmark's anchor, and print its path.

    python scripts/build_llama_server.py [--cmake-args "..."] [--stock] [--force]

llama-server is the engine Ollama runs today (continuous batching, a shared KV cache,
`--parallel` slots, prompt caching). This builds it from the llama.cpp tree that
llama-cpp-python 0.3.36's sdist vendors, the very source whose ggml herd's ggml backend
is built from (scripts/build_ggml.py), with the same CPU flags (scripts/cpu_cmake_args.py,
plus llamafile) and, unless `--stock`, herd's ggml patches (build_ggml.PATCHES: a prefetch,
attention's query tiles and the tiled Q4_1 prompt matmul, each leaving every result
bit-identical), so herd and the anchor run the same kernels and a difference between them
is the serving engine's. `--stock` builds llama.cpp as released.

Only the `llama-server` target, statically linked (the binary alone is kept), without
libcurl, OpenSSL, tests, examples or the web UI (whose assets would be downloaded). The
binary is cached in ~/.cache/herd/llama-server/<key>, the key made of the source's version,
the CMake options and the patches, so a second run only prints the path.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from build_ggml import CACHE, LLAMA_CPP_PYTHON, PATCHES, _extract, default_cmake_args, sdist

# What the anchor needs and nothing that reaches the network or builds unused targets.
FIXED_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
]


def cache_key(cmake_args: str, stock: bool) -> tuple[str, str]:
    """(a description of the build, the short key its binary is cached under)."""
    ident = f"llama.cpp of llama-cpp-python {LLAMA_CPP_PYTHON} | {cmake_args}"
    ident += " | " + " ".join(FIXED_ARGS)
    if stock:
        ident += " | stock"
    else:
        ident += f" | patches {hashlib.sha256(repr(PATCHES).encode()).hexdigest()[:12]}"
    return ident, hashlib.sha256(f"{ident} | {platform.machine()}".encode()).hexdigest()[:16]


def apply_patches(ggml: Path) -> None:
    """herd's ggml patches (build_ggml.PATCHES), each of which must match exactly once."""
    for name, old, new in PATCHES:
        path = ggml / name
        text = path.read_text()
        if text.count(old) != 1:
            sys.exit(f"build_llama_server: {name} no longer has the code herd patches")
        path.write_text(text.replace(old, new))


def build(cmake_args: str, stock: bool, out: Path, jobs: int) -> Path:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            sys.exit(
                f"build_llama_server: `{tool}` is not on PATH (install cmake and a C++ compiler)"
            )
    with tempfile.TemporaryDirectory(prefix="herd-llama-server-") as tmp:
        work = Path(tmp)
        tree = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp"
        _extract(sdist("llama-cpp-python", LLAMA_CPP_PYTHON), work, tree + "/")
        src = work / tree
        if not stock:
            apply_patches(src / "ggml")
        build_dir = work / "build"
        configure = ["cmake", "-S", str(src), "-B", str(build_dir), *FIXED_ARGS]
        subprocess.run([*configure, *cmake_args.split()], check=True)
        target = ["cmake", "--build", str(build_dir), "--target", "llama-server", f"-j{jobs}"]
        subprocess.run(target, check=True)
        binary = next(build_dir.rglob("llama-server"), None)
        if binary is None or not os.access(binary, os.X_OK):
            sys.exit("build_llama_server: the build finished without a llama-server binary")
        out.mkdir(parents=True, exist_ok=True)
        partial = out / "llama-server.partial"
        shutil.copy2(binary, partial)
        return partial.replace(out / "llama-server")  # whole or absent, never half-written


def ensure(
    cmake_args: str | None = None, stock: bool = False, force: bool = False, jobs: int = 2
) -> Path:
    """The cached binary for these options, built first when there is none."""
    args = cmake_args if cmake_args is not None else default_cmake_args()
    ident, key = cache_key(args, stock)
    out = CACHE / "llama-server" / key
    binary = out / "llama-server"
    if force or not binary.exists():
        print(f"building llama-server: {ident} (several minutes)", file=sys.stderr, flush=True)
        binary = build(args, stock, out, jobs)
        (out / "build.txt").write_text(ident + "\n")
    return binary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cmake-args", default=None, help="default: this CPU's, with llamafile")
    ap.add_argument("--stock", action="store_true", help="without herd's ggml patch")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    args = ap.parse_args()
    print(ensure(args.cmake_args, args.stock, args.force, args.jobs))


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:  # cmake said why above; one line, no traceback
        sys.exit(
            f"build_llama_server: `{' '.join(map(str, e.cmd[:4]))} ...` failed "
            f"(exit {e.returncode})"
        )
