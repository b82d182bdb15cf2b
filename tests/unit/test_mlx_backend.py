"""What the MLX backend does beyond the op suite (tests/unit/test_ops.py runs every op on
it against NumPy): persistent cache writes, quantized gathers, its device, the report of
dequantized weights and the errors it gives at load."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize

from herd.errors import BackendError, GGUFError, OutOfMemoryError
from herd.gguf.quants import quantize
from herd.gguf.reader import open_gguf
from herd.ml import BackendOptions, DType, open_backend

mx = pytest.importorskip("mlx.core", reason="mlx not installed (pip install -e '.[mlx]')")

from herd.ml.backends.mlx import MlxBackend  # noqa: E402
from herd.ml.backends.mlx import backend as mlx_backend  # noqa: E402
from herd.ml.backends.mlx.quant import MlxWeight  # noqa: E402
from herd.ml.backends.mlx.tensor import MlxTensor  # noqa: E402


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def write(path: Path, tensors: dict[str, tuple[np.ndarray, Q]]) -> Path:
    """Each weight quantized to its type by herd (F32 as it is)."""
    raw = {n: (w, None) if q == Q.F32 else (quantize(w, q), q) for n, (w, q) in tensors.items()}
    return write_raw(path, raw)


def write_raw(path: Path, tensors: dict[str, tuple[np.ndarray, Q | None]]) -> Path:
    """Arrays as they are (None) or as the bytes of a GGUF type."""
    writer = GGUFWriter(str(path), "test")
    for name, (a, qtype) in tensors.items():
        if qtype is None:
            writer.add_tensor(name, a)
        else:
            writer.add_tensor(name, a, raw_shape=a.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


WEIGHTS = {
    "emb.Q8_0": (rand(20, 64, seed=1), Q.Q8_0),
    "emb.Q4_0": (rand(20, 64, seed=2), Q.Q4_0),
    "w.Q6_K": (rand(8, 256, seed=3), Q.Q6_K),
    "w.F32": (rand(8, 64, seed=4), Q.F32),
}


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("mlx") / "w.gguf", WEIGHTS)


@pytest.fixture(scope="module")
def backend(path: Path) -> Any:
    b = open_backend("mlx", open_gguf(path), BackendOptions(num_gpu=0))
    yield b
    b.close()


def compute(b: Any, build: Any, *inputs: np.ndarray) -> list[np.ndarray]:
    with b.new_context() as ctx:
        args = [ctx.input(a, DType.I32 if a.dtype.kind in "iu" else DType.F32) for a in inputs]
        out = build(ctx, *args)
        return ctx.compute(*(out if isinstance(out, tuple) else (out,)))


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16, DType.BF16])
def test_cache_writes_persist_across_contexts(backend: Any, dtype: DType) -> None:
    """Rows and columns written in one pass are read back by later passes, over earlier
    writes, with untouched cells still zero; a pass that is never computed still writes
    (as on the eager NumPy backend)."""
    rows, cols = backend.alloc((6, 2, 4), dtype), backend.alloc((2, 4, 6), dtype)
    want_rows, want_cols = np.zeros((6, 2, 4), np.float32), np.zeros((2, 4, 6), np.float32)
    for ids, seed in (([4, 1], 1), ([1, 5, 0], 2)):
        values = rand(len(ids), 2, 4, seed=seed)
        with backend.new_context() as ctx:
            i = ctx.input(np.array(ids, np.int32), DType.I32)
            v = ctx.input(values)
            ctx.forward(rows.set_rows(i, v), cols.set_columns(i, v.permute(1, 2, 0)))
            ctx.compute()
        want_rows[ids] = values
        want_cols[..., ids] = values.transpose(1, 2, 0)
    got_rows, got_cols = compute(backend, lambda c: (c.attach(rows), c.attach(cols)))
    # the cache holds the values rounded to its type, nothing else
    rounded = {DType.F32: np.float32, DType.F16: np.float16}.get(dtype)
    if rounded is not None:
        np.testing.assert_array_equal(got_rows, want_rows.astype(rounded).astype(np.float32))
        np.testing.assert_array_equal(got_cols, want_cols.astype(rounded).astype(np.float32))
    else:  # bfloat16: 8 bits of mantissa
        np.testing.assert_allclose(got_rows, want_rows, rtol=1 / 128, atol=0)
        np.testing.assert_allclose(got_cols, want_cols, rtol=1 / 128, atol=0)
    assert rows.dtype == dtype and not np.any(got_rows[[2, 3]])


def test_quantized_cache_type_is_kept_as_f16(backend: Any) -> None:
    """MLX has no Q8_0/Q4_0 arrays: such a cache is F16, and reads back its values to
    F16 precision (better than the block types would)."""
    cache = backend.alloc((4, 32), DType.Q8_0)
    assert cache.dtype == DType.F16
    values = rand(2, 32, seed=7)
    with backend.new_context() as ctx:
        ids = ctx.input(np.array([3, 0], np.int32), DType.I32)
        ctx.forward(cache.set_rows(ids, ctx.input(values)))
        (got,) = ctx.compute(ctx.attach(cache))
    np.testing.assert_array_equal(got[[3, 0]], values.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("name", ["emb.Q8_0", "emb.Q4_0"])
def test_quantized_get_rows_equals_dequantized_rows(backend: Any, name: str) -> None:
    """A quantized embedding gathers packed rows and dequantizes only those: exactly the
    rows of the whole table dequantized, and of gguf's reference dequantization."""
    w = backend.weight(name)
    assert w.w.quantized, f"{name} should stay quantized on MLX"
    ids = np.array([7, 0, 19, 7, 3], np.int32)
    (got,) = compute(backend, lambda c, i: backend.weight(name).get_rows(i), ids)
    whole = np.array(w.w.to_dense(mx.float32))
    np.testing.assert_array_equal(got, whole[ids])
    g = open_gguf(backend.gguf.path)
    ref = dequantize(g.raw(name).reshape(20, -1), g.tensors[name].type).astype(np.float32)
    np.testing.assert_array_equal(got, ref[ids])


def test_get_rows_of_a_quantized_weight_made_by_mlx(backend: Any) -> None:
    """The same path on MLX's own quantization (4 bits, groups of 64), whatever the GGUF
    mapping does: gathered rows equal `mx.dequantize` of the whole table."""
    table = mx.array(rand(10, 128, seed=5))
    packed, scales, biases = mx.quantize(table, group_size=64, bits=4)
    w = MlxWeight((10, 128), Q.Q4_1, None, packed, scales, biases, 4, 64)
    ids = np.array([9, 2, 2], np.int32)
    (got,) = compute(backend, lambda c, i: MlxTensor(None, None, w).get_rows(i), ids)
    whole = np.array(mx.dequantize(packed, scales, biases, group_size=64, bits=4))
    np.testing.assert_array_equal(got, whole[ids])


def test_num_gpu_zero_runs_on_the_cpu(backend: Any) -> None:
    assert backend.device == mx.cpu
    assert [d.kind for d in backend.devices()] == ["cpu"]
    info = backend.devices()[0]
    assert 0 < info.free_memory <= info.total_memory
    with backend.new_context():
        assert mx.default_device() == mx.cpu  # ops of this pass run on its stream
    # the CPU's composed attention pays for every padded cell: a finer pad than a GPU's
    assert backend.cache_config().pad == mlx_backend.CACHE_PAD_CPU < mlx_backend.CACHE_PAD


def test_num_gpu_without_a_gpu_runs_on_the_cpu(path: Path) -> None:
    """As ggml: asking for GPU layers where there is no GPU is no error; the model runs
    on the CPU. Where MLX has a GPU, it runs there."""
    b = open_backend("mlx", open_gguf(path), BackendOptions(num_gpu=99))
    has_gpu = mx.metal.is_available() or mx.cuda.is_available()
    assert b.device == (mx.gpu if has_gpu else mx.cpu)
    assert b.devices()[0].kind == ("gpu" if has_gpu else "cpu")


def test_dequantized_weights_are_reported(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Q6_K has no exact MLX mapping (16-element sub-blocks): dequantized at load, named
    in `dequantized` and in one log line with the memory it cost; Q8_0/Q4_0 are not."""
    with caplog.at_level(logging.INFO, logger="herd.ml.backends.mlx"):
        b = open_backend("mlx", open_gguf(path), BackendOptions(num_gpu=0))
    assert isinstance(b, MlxBackend)
    assert b.dequantized == {"w.Q6_K": "Q6_K"}
    assert b.weight("w.Q6_K").w.dequantized_from == "Q6_K"
    assert b.weight_bytes == sum(b.weight(n).w.nbytes for n in WEIGHTS)
    lines = [r.getMessage() for r in caplog.records if "dequantized" in r.getMessage()]
    assert len(lines) == 1 and "1 tensors" in lines[0] and "Q6_K: w.Q6_K" in lines[0], lines
    # F16 costs 2 bytes an element, over Q6_K's 210 bytes per 256
    extra = 8 * 256 * 2 - 8 * 210
    assert f"+{extra / 1024:.1f} KiB" in lines[0]


def test_unsupported_type_fails_at_load(tmp_path: Path) -> None:
    """Q8_K (ggml's activation-only type): a GGUFError at open naming tensor and type,
    before any answer, not on first use."""
    path = write_raw(tmp_path / "q.gguf", {"blk.0.odd": (np.zeros((4, 292), np.uint8), Q.Q8_K)})
    with pytest.raises(GGUFError, match=r"blk\.0\.odd.*Q8_K"):
        open_backend("mlx", open_gguf(path))


def test_a_64_bit_tensor_fails_at_load(tmp_path: Path) -> None:
    """MLX has no 64-bit arrays on Metal: an I64 tensor is refused at open, named with
    its type, before any weight is read (not when a pass first touches it)."""
    tensors = {"w.F32": (rand(8, 64), None), "blk.0.ids": (np.arange(8, dtype=np.int64), None)}
    path = write_raw(tmp_path / "i64.gguf", tensors)
    with pytest.raises(GGUFError, match=r"blk\.0\.ids has type I64.*mlx backend cannot"):
        open_backend("mlx", open_gguf(path))


def test_a_cache_type_mlx_has_no_arrays_for_is_refused(backend: Any) -> None:
    """The KV cache is allocated when the runner starts, so a type MLX cannot hold is a
    BackendError then, naming the types it can, never a failure in the middle of a pass."""
    with pytest.raises(BackendError, match="cannot allocate a OTHER tensor; supported: f32"):
        backend.alloc((4, 8), DType.OTHER, layer=0)


def test_alloc_beyond_memory_is_refused(backend: Any) -> None:
    with pytest.raises(OutOfMemoryError, match="lower num_ctx"):
        backend.alloc((1 << 40, 1024), DType.F32, layer=3)


def test_composed_attention_equals_fused(path: Path) -> None:
    """flash_attention=False composes attention from matmul_t and softmax, as nn would;
    both agree, with a GQA cache and a causal mask."""
    q, k, v = rand(5, 4, 16), rand(9, 2, 16, seed=1), rand(9, 2, 8, seed=2)
    mask = np.where(np.arange(9)[None, :] <= np.arange(5)[:, None] + 4, 0, -np.inf)
    outs = []
    for fa in (True, False):
        b = open_backend("mlx", open_gguf(path), BackendOptions(num_gpu=0, flash_attention=fa))
        assert b.cache_config().flash_attention is fa
        outs += compute(
            b,
            lambda c, q, k, v, m: q.scaled_dot_product_attention(k, v, m, 0.25),
            q,
            k,
            v,
            mask.astype(np.float32),
        )
    assert outs[0].shape == (5, 4 * 8)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True], ids=["replayed", "mx.compile"])
def test_rerun_replays_the_pass_with_its_cache_writes(
    path: Path, monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    """A decode-like pass (cache write at a cell, rope, fused attention over the cache,
    a quantized projection) rerun with new inputs equals building it again, step after
    step, and leaves the cache as the built passes do; under `mx.compile` (what GPUs
    use) as well as replayed op by op (the CPU)."""
    from herd.ml.backends.mlx.context import MlxContext

    monkeypatch.setattr(MlxContext, "_compiled", property(lambda self: compiled))
    steps = [
        (rand(1, 2, 32, seed=s), np.array([s], np.int32), np.array([s + 2], np.int32))
        for s in range(4)
    ]
    results = []
    for reuse in (True, False):
        b = open_backend("mlx", open_gguf(path), BackendOptions(num_gpu=0))
        cache = b.alloc((8, 2, 32), DType.F16)
        got, ctx = [], None
        for x, pos, cell in steps:
            if reuse and ctx is not None:
                got.append(ctx.rerun(x, pos, cell, np.zeros((1, 8), np.float32))[0].copy())
                continue
            ctx = b.new_context()
            ins = [ctx.input(x), ctx.input(pos, DType.I32), ctx.input(cell, DType.I32)]
            got.append(ctx.compute(_decode_like(ctx, b, cache, *ins))[0])
            if not reuse:
                ctx.close()
        (stored,) = compute(b, lambda c, cache=cache: c.attach(cache))
        results.append((got, stored))
    (reran, cache_reran), (built, cache_built) = results
    for r, w in zip(reran, built, strict=True):
        np.testing.assert_allclose(r, w, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache_reran, cache_built)
    assert np.count_nonzero(cache_built.any(axis=(1, 2))) == 4  # cells 2..5 written


def _decode_like(c: Any, b: Any, cache: Any, x: Any, pos: Any, cell: Any) -> Any:
    from herd.ml.base import RopeOptions

    k = x.rope(pos, RopeOptions(dims=32, neox=True))
    c.forward(cache.set_rows(cell, k))
    keys = c.attach(cache)  # (8, 2, 32), the write included
    mask = c.input(np.zeros((1, 8), np.float32))
    q = x.reshape(1, 2, 32).repeat(1, 4, 32)  # 4 query heads over 2
    out = q.scaled_dot_product_attention(keys, keys, mask, 0.2)  # (1, 128)
    return out.slice(1, 0, 64).linear(b.weight("emb.Q8_0"))  # (1, 20)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q6_K, Q.F32])
def test_large_weights_split_over_cpu_streams_give_the_same_product(
    tmp_path: Path, qtype: Q
) -> None:
    """On the CPU, a weight of 512+ rows is cut into one row slice per thread, computed on
    streams side by side: the product equals the whole weight's bit for bit (quantized,
    dequantized-dense and plain weights alike), and smaller weights stay whole."""
    from herd.ml.backends.mlx.backend import MIN_SPLIT_ROWS

    rows = MIN_SPLIT_ROWS + 100  # uneven slices
    p = write(tmp_path / "big.gguf", {"w": (rand(rows, 256, seed=7), qtype), **WEIGHTS})
    x = rand(5, 256, seed=8)
    outs = []
    for threads in (1, 3):
        b = open_backend("mlx", open_gguf(p), BackendOptions(num_gpu=0, num_thread=threads))
        assert len(b.weight("w").w.parts) == (3 if threads == 3 else 0)
        assert [len(s.shape) for s in b.weight("w.F32").w.parts] == []  # 8 rows: whole
        with b.new_context() as ctx:
            (y,) = ctx.compute(ctx.input(x).linear(b.weight("w")))
        outs.append(y)
    assert sum(s.shape[0] for s in b.weight("w").w.parts) == rows
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize(
    ("system", "machine", "picked"),
    [("darwin", "arm64", "mlx"), ("darwin", "x86_64", "ggml"), ("linux", "aarch64", "ggml")],
)
def test_auto_picks_mlx_on_apple_silicon_only(
    monkeypatch: pytest.MonkeyPatch, system: str, machine: str, picked: str
) -> None:
    """`auto` takes MLX where mlx imports on an Apple-silicon Mac (Metal), ggml elsewhere
    (MLX's CPU kernels are single-threaded: an order of magnitude behind ggml there)."""
    from types import SimpleNamespace

    from herd.ml import available_backends, registry

    if picked == "ggml" and "ggml" not in available_backends():
        pytest.skip("ggml-python not installed (pip install -e '.[ggml]')")
    monkeypatch.setattr(registry, "sys", SimpleNamespace(platform=system))
    monkeypatch.setattr(registry.platform, "machine", lambda: machine)
    assert registry.resolve_backend_name("auto") == picked
