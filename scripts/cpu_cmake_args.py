"""Print the CMake options that build ggml for this machine's CPU, AMX left out.

    CMAKE_ARGS="$(python scripts/cpu_cmake_args.py) -DGGML_LLAMAFILE=ON" pip install ...

Why not GGML_NATIVE: on these x86 VMs `-march=native` made herd's decode ~15% slower
(61 vs 72 tokens/s on SmolLM2, same ggml source, alternating runs) and enables AMX
kernels that crash where the hypervisor reports AMX. Naming the vector extensions the
CPU has gives llama.cpp's own release flags, so herd and llama-cpp-python (goldens,
benchmark peer) run the same kernels. Elsewhere (ARM, macOS) native is right.
"""

from __future__ import annotations

import platform
from pathlib import Path

# /proc/cpuinfo flag -> ggml CMake option (ggml/CMakeLists.txt, x86 section)
X86_OPTIONS = [
    ("avx", "GGML_AVX"),
    ("avx2", "GGML_AVX2"),
    ("fma", "GGML_FMA"),
    ("f16c", "GGML_F16C"),
    ("bmi2", "GGML_BMI2"),
    ("avx_vnni", "GGML_AVX_VNNI"),
    ("avx512f", "GGML_AVX512"),
    ("avx512vbmi", "GGML_AVX512_VBMI"),
    ("avx512_vnni", "GGML_AVX512_VNNI"),
    ("avx512_bf16", "GGML_AVX512_BF16"),
]


def cmake_args(machine: str, flags: set[str]) -> str:
    if machine not in ("x86_64", "AMD64") or not flags:
        return "-DGGML_NATIVE=ON"
    on = [f"-D{opt}=ON" for flag, opt in X86_OPTIONS if flag in flags]
    return " ".join(["-DGGML_NATIVE=OFF", *on])


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


if __name__ == "__main__":
    print(cmake_args(platform.machine(), cpu_flags()))
