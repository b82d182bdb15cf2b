"""Build and install ggml-python with the ggml that llama.cpp ships, for herd's ggml backend.

    python scripts/build_ggml.py [--cmake-args "..."] [--force]

herd binds to the ggml libraries ggml-python builds (its Python module is not used). The
ggml that ggml-python 0.0.45 vendors is older than llama.cpp's: the same API and structs,
but its K-quant matmuls round differently (Gemma 3 logits 0.974 top-1 / 0.032 mean
|Δ log p| against llama.cpp, bit-identical with the newer source) and it lacks the tiled
prompt matmuls. So this builds ggml-python 0.0.45 with its `vendor/ggml` replaced by the
ggml of llama-cpp-python 0.3.36 (the benchmark peer and goldens maker): herd and
llama.cpp then run the very same kernels. herd adds three changes (PATCHES), each leaving
every result bit-identical: matrix-vector products prefetch their weight rows (a decode
step ~1.3x faster on a 2-core Xeon), fused attention takes its queries in tiles of 256,
not 64 (a vision encoder's attention ~1.6x faster), and a prompt's Q4_1 matmuls run in
tiles of weight rows by tokens (2.1x on SmolLM2's shapes, 2-core AMD EPYC with AVX-512).

Both sources are PyPI sdists, downloaded once into ~/.cache/herd/sdist; the wheel is kept
in ~/.cache/herd/wheels-built under a key of versions and CMake options (never taken from
pip's own cache, which cannot tell builds with other flags apart). Installs into the
running Python, and does nothing when that Python already has this very build.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

GGML_PYTHON = "0.0.45"
LLAMA_CPP_PYTHON = "0.3.36"
CACHE = Path(os.environ.get("HERD_CACHE", Path.home() / ".cache" / "herd"))
MARKER = Path(sys.prefix) / "herd-ggml-build"  # which build this environment has


def default_cmake_args() -> str:
    sys.path.insert(0, str(Path(__file__).parent))
    from cpu_cmake_args import cmake_args, cpu_flags

    return cmake_args(platform.machine(), cpu_flags()) + " -DGGML_LLAMAFILE=ON -DGGML_RPC=ON"


# The Q4_1 tile kernel (PATCHES, below), placed after ggml_vec_dot_q4_1_q8_1 in the x86
# quants.c so it shares that function's helpers; its call, in ggml's matmul chunk loop.
TILE_Q4_1 = r"""
#if defined(__AVX2__)
// AVX-512's 32 vector registers hold a tile of 4 x 4 accumulators, AVX2's 16 one of 4 x 2
#if defined(__AVX512F__)
#define HERD_Q4_1_NC 4
#else
#define HERD_Q4_1_NC 2
#endif
// herd: outputs s[r + c*bs] of NR Q4_1 rows (bx bytes apart) by NC Q8_1 columns (by apart),
// each as ggml_vec_dot_q4_1_q8_1 computes it: the same sums in the same order.
static inline __attribute__((always_inline)) void herd_q4_1_tile(
        const int nb, float * GGML_RESTRICT s, const size_t bs, const char * GGML_RESTRICT vx,
        const size_t bx, const char * GGML_RESTRICT vy, const size_t by, const int NR,
        const int NC) {
    __m256 acc[4][HERD_Q4_1_NC];
    __m128 summs[HERD_Q4_1_NC];  // lane r: row r's sum of m * s, one fma per lane as vec_dot's
    for (int c = 0; c < NC; ++c) {
        summs[c] = _mm_setzero_ps();
        for (int r = 0; r < NR; ++r) {
            acc[r][c] = _mm256_setzero_ps();
        }
    }
    for (int ib = 0; ib < nb; ++ib) {
        __m256i qx[4];
        __m256 d0[4];
        float m0[4] = {0, 0, 0, 0};
        for (int r = 0; r < NR; ++r) {
            const block_q4_1 * x = (const block_q4_1 *) (vx + r * bx) + ib;
            d0[r] = _mm256_set1_ps(GGML_CPU_FP16_TO_FP32(x->d));
            m0[r] = GGML_CPU_FP16_TO_FP32(x->m);
            qx[r] = bytes_from_nibbles_32(x->qs);
        }
        const __m128 m0v = _mm_loadu_ps(m0);
        for (int c = 0; c < NC; ++c) {
            const block_q8_1 * y = (const block_q8_1 *) (vy + c * by) + ib;
            const __m256 d1 = _mm256_set1_ps(GGML_CPU_FP16_TO_FP32(y->d));
            summs[c] = _mm_fmadd_ps(m0v, _mm_set1_ps(GGML_CPU_FP16_TO_FP32(y->s)), summs[c]);
            const __m256i qy = _mm256_loadu_si256((const __m256i *) y->qs);
            for (int r = 0; r < NR; ++r) {
                const __m256 xy = mul_sum_us8_pairs_float(qx[r], qy);
                acc[r][c] = _mm256_fmadd_ps(_mm256_mul_ps(d0[r], d1), xy, acc[r][c]);
            }
        }
    }
    for (int c = 0; c < NC; ++c) {
        float sm[4];
        _mm_storeu_ps(sm, summs[c]);
        for (int r = 0; r < NR; ++r) {
            s[r + c * bs] = hsum_float_8(acc[r][c]) + sm[r];
        }
    }
}

// herd: the nr x nc outputs of a block of Q4_1 rows by Q8_1 columns, in tiles of 4 rows
void herd_gemm_q4_1_q8_1(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx,
                         size_t bx, const void * GGML_RESTRICT vy, size_t by, int nr, int nc) {
    const int nb = n / QK8_1;
    const char * x = (const char *) vx;
    const char * y = (const char *) vy;
    int r = 0;
    for (; r + 4 <= nr; r += 4) {
        int c = 0;
#if HERD_Q4_1_NC == 4
        for (; c + 4 <= nc; c += 4) {
            herd_q4_1_tile(nb, s + r + c * bs, bs, x + r * bx, bx, y + c * by, by, 4, 4);
        }
#endif
        for (; c + 2 <= nc; c += 2) {
            herd_q4_1_tile(nb, s + r + c * bs, bs, x + r * bx, bx, y + c * by, by, 4, 2);
        }
        for (; c < nc; ++c) {
            herd_q4_1_tile(nb, s + r + c * bs, bs, x + r * bx, bx, y + c * by, by, 4, 1);
        }
    }
    for (; r < nr; ++r) {
        int c = 0;
        for (; c + 2 <= nc; c += 2) {
            herd_q4_1_tile(nb, s + r + c * bs, bs, x + r * bx, bx, y + c * by, by, 1, 2);
        }
        for (; c < nc; ++c) {
            herd_q4_1_tile(nb, s + r + c * bs, bs, x + r * bx, bx, y + c * by, by, 1, 1);
        }
    }
}
#endif

"""
CALL_TILE_Q4_1 = r"""
#if defined(__AVX2__)
    // herd: a Q4_1 weight by several tokens goes to the tiled kernel (quants.c), whose
    // outputs equal vec_dot's bit for bit
    if (type == GGML_TYPE_Q4_1 && ir1_end - ir1_start > 1 && ne02 == 1 && ne03 == 1 &&
        ne12 == 1 && ne13 == 1 && (src1_cont || src1->type != vec_dot_type)) {
        void herd_gemm_q4_1_q8_1(int, float *, size_t, const void *, size_t, const void *,
                                 size_t, int, int);
        for (int64_t iir1 = ir1_start; iir1 < ir1_end; iir1 += blck_1) {
            for (int64_t iir0 = ir0_start; iir0 < ir0_end; iir0 += blck_0) {
                herd_gemm_q4_1_q8_1((int) ne00, (float *) ((char *) dst->data + iir1 * nb1) + iir0,
                                    nb1 / sizeof(float), (const char *) src0->data + iir0 * nb01,
                                    nb01, (const char *) wdata + iir1 * row_size, row_size,
                                    (int) MIN(blck_0, ir0_end - iir0),
                                    (int) MIN(blck_1, ir1_end - iir1));
            }
        }
        return;
    }
#endif
"""


# herd's changes to ggml's source, applied before the build: (file under vendor/ggml, the
# text replaced, its replacement). Each old text must occur exactly once (a newer ggml that
# moved it fails the build with a clear message); the texts are part of the cache key.
PATCHES: list[tuple[str, str, str]] = [
    (
        # A matrix-vector product (a decode step's every projection) streams each weight row
        # once, and the CPU's prefetchers alone leave ggml's dot products waiting on memory:
        # fetch the bytes 2 KB ahead of each row as its dot product starts (1-4 KB measured
        # alike). The same kernels, the same results; only the loads arrive earlier.
        "src/ggml-cpu/ggml-cpu.c",
        """ir0 += num_rows_per_vec_dot) {
                    vec_dot(""",
        """ir0 += num_rows_per_vec_dot) {
#if defined(__GNUC__)
                    if (ir1_end - ir1_start == 1) {  // herd: prefetch 2 KB ahead
                        const char * ahead = src0_row + ir0 * nb01 + 2048;
                        for (size_t o = 0; o < nb01; o += 64) {
                            __builtin_prefetch(ahead + o, 0, 3);
                        }
                    }
#endif
                    vec_dot(""",
    ),
    # Fused attention over many queries (a vision encoder's 4096 patches; CPU prompts with
    # flash attention) converts each 64-key tile of K and V to F32 once per tile of queries:
    # tiles of 256 queries convert a quarter as often. SigLIP's attention took 1376 ms a
    # layer at 64, 1000 at 128, 856 at 256 (torch's sdpa 774-859). Each query row is
    # computed as before (the same key tiles, the same order): the same results. Batches of
    # 64-255 queries keep the tiled kernel they took at 64 (a partial tile, padded).
    ("src/ggml-cpu/common.h", "#define GGML_FA_TILE_Q  64", "#define GGML_FA_TILE_Q  256"),
    ("src/ggml-cpu/ops.cpp", "neq1 >= Q_TILE_SZ);", "neq1 >= 64);  // herd: as at tile 64"),
    # A prompt's Q4_1 matmuls (SmolLM2's every layer) have no tiled kernel on x86: llamafile's
    # takes Q4_0 and Q8_0, not Q4_1, so ggml calls one dot product per weight row and token,
    # unpacking each weight block again for every token (77% of a 7-prompt serving step in
    # ggml_vec_dot_q4_1_q8_1 under perf). Tiles of 4 rows x 4 tokens (4 x 2 on AVX2) unpack a
    # block once for the tile's tokens and load a token's block once for 4 rows. Each output
    # is still computed as ggml_vec_dot_q4_1_q8_1 computes it (the same integer sums, the
    # same float operations in the same order), so the results are bit-identical;
    # tests/unit/test_ggml_kernels.py checks a prompt's rows against them one token at a time.
    (
        "src/ggml-cpu/arch/x86/quants.c",
        "void ggml_vec_dot_mxfp4_q8_0(int n",
        TILE_Q4_1 + "void ggml_vec_dot_mxfp4_q8_0(int n",
    ),
    (
        "src/ggml-cpu/ggml-cpu.c",
        "    float tmp[32];\n",
        "    float tmp[32];\n" + CALL_TILE_Q4_1,
    ),
]


def patch(ggml: Path) -> None:
    for name, old, new in PATCHES:
        path = ggml / name
        text = path.read_text()
        if text.count(old) != 1:
            sys.exit(f"build_ggml: {name} no longer has the code herd patches; update PATCHES")
        path.write_text(text.replace(old, new))


def sdist(project: str, version: str) -> Path:
    """The project's sdist from PyPI (pip's normal client), cached."""
    dest = CACHE / "sdist"
    stem = f"{project.replace('-', '_')}-{version}"
    found = sorted(dest.glob(f"{stem}.tar.gz"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*cmd, "-d", str(dest), f"{project}=={version}"], check=True)
    return next(dest.glob(f"{stem}.tar.gz"))


def _extract(archive: Path, into: Path, member_prefix: str | None = None) -> None:
    with tarfile.open(archive) as tar:
        members = [
            m for m in tar.getmembers() if member_prefix is None or m.name.startswith(member_prefix)
        ]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(into, members=members, **safe)


def build(cmake_args: str, out: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="herd-ggml-") as tmp:
        work = Path(tmp)
        _extract(sdist("ggml-python", GGML_PYTHON), work)
        llama_ggml = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/ggml"
        _extract(sdist("llama-cpp-python", LLAMA_CPP_PYTHON), work, llama_ggml)
        src = work / f"ggml_python-{GGML_PYTHON}"
        shutil.rmtree(src / "vendor" / "ggml")
        shutil.move(str(work / llama_ggml), src / "vendor" / "ggml")
        patch(src / "vendor" / "ggml")
        env = {**os.environ, "CMAKE_ARGS": cmake_args}
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir"]
        subprocess.run([*cmd, "-w", str(work / "dist"), str(src)], check=True, env=env)
        wheel = next((work / "dist").glob("ggml_python-*.whl"))
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(wheel, out / wheel.name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cmake-args", default=None, help="default: this CPU's, with llamafile")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args()
    cmake_args = args.cmake_args if args.cmake_args is not None else default_cmake_args()
    ident = f"ggml-python {GGML_PYTHON} | llama.cpp ggml of {LLAMA_CPP_PYTHON} | {cmake_args}"
    ident += f" | patches {hashlib.sha256(repr(PATCHES).encode()).hexdigest()[:12]}"
    key = hashlib.sha256(f"{ident} | {platform.machine()}".encode()).hexdigest()[:16]
    if not args.force and MARKER.exists() and MARKER.read_text().strip() == key:
        return
    out = CACHE / "wheels-built" / f"ggml-{key}"
    wheels = sorted(out.glob("ggml_python-*.whl"))
    if args.force or not wheels:
        print(f"building {ident} (about a minute)", file=sys.stderr, flush=True)
        wheels = [build(cmake_args, out)]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps"]
    subprocess.run([*pip, str(wheels[0])], check=True)
    MARKER.write_text(key + "\n")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:  # pip said why above; one line, no traceback
        sys.exit(f"build_ggml: `{' '.join(map(str, e.cmd[:5]))} ...` failed (exit {e.returncode})")
