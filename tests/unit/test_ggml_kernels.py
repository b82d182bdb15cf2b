"""herd's changes to ggml's kernels (scripts/build_ggml.py, PATCHES) leave every result
bit-identical: a prompt's rows, which go through the tiled Q4_1 kernel, equal the same
rows computed one token at a time, which go through ggml's own dot product."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize

from herd.gguf.quants import quantize
from herd.gguf.reader import open_gguf
from herd.ml import BackendOptions, DType, available_backends, open_backend

if "ggml" not in available_backends():
    pytest.skip("ggml-python not installed (make install)", allow_module_level=True)

# rows not a multiple of the kernel's 4 and more than ggml's 16-row chunks; K as SmolLM2's
# attention (576) and feed-forward (1536) inputs
SHAPES = [(4 * 16 + 3, 576), (40, 1536)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """The GGUF's path and each weight as gguf dequantizes it."""
    path = tmp_path_factory.mktemp("kernels") / "w.gguf"
    writer = GGUFWriter(str(path), "test")
    rng = np.random.default_rng(0)
    dense = {}
    for n, k in SHAPES:
        raw = quantize(rng.standard_normal((n, k)).astype(np.float32), Q.Q4_1)
        writer.add_tensor(f"w.{n}x{k}", raw, raw_shape=raw.shape, raw_dtype=Q.Q4_1)
        dense[f"w.{n}x{k}"] = np.asarray(dequantize(raw, Q.Q4_1), np.float64).reshape(n, k)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, dense


def linear(backend: object, name: str, x: np.ndarray) -> np.ndarray:
    with backend.new_context() as ctx:  # type: ignore[attr-defined]
        out = ctx.input(x, DType.F32).linear(backend.weight(name))  # type: ignore[attr-defined]
        return ctx.compute(out)[0]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [2, 3, 37])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_q4_1_prompt_rows_equal_rows_one_at_a_time(
    weights: tuple[Path, dict[str, np.ndarray]], shape: tuple[int, int], tokens: int, threads: int
) -> None:
    path, dense = weights
    backend = open_backend("ggml", open_gguf(path), BackendOptions(num_thread=threads))
    try:
        name = f"w.{shape[0]}x{shape[1]}"
        x = np.random.default_rng(tokens).standard_normal((tokens, shape[1])).astype(np.float32)
        together = linear(backend, name, x)
        alone = np.concatenate([linear(backend, name, x[t : t + 1]) for t in range(tokens)])
        assert together.shape == (tokens, shape[0])
        np.testing.assert_array_equal(together, alone)
        # and it is the product, x rounded to 8 bits per block of 32 on the way (q8_1, as
        # llama.cpp rounds it): within 1% of float64's on gguf's dequantized weight
        want = x.astype(np.float64) @ dense[name].T
        assert np.max(np.abs(together - want)) < 0.01 * np.max(np.abs(want))
    finally:
        backend.close()
