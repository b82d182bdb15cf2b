"""Every op of the ml contract on every installed backend, against the NumPy oracle.

Weights come from a real GGUF written to a temporary directory, so quantized types go
through each backend's own loading path (the ggml backend maps the file). Accuracy is the
normalized mean squared error mse(got, want) / mean(want²); exact ops must match exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gpu import NUM_GPU, ggml_gpus

from herd.errors import BackendError, GGUFError
from herd.gguf import GGUFFile
from herd.gguf.quants import quantize
from herd.gguf.reader import open_gguf
from herd.ml import (
    BackendOptions,
    DeviceInfo,
    DType,
    GraphReuse,
    RopeOptions,
    Tensor,
    available_backends,
    open_backend,
)
from herd.ml.backends.numpy import NumpyBackend
from herd.nn.attention import attention, query_rows

BACKENDS = [name for name in available_backends() if name != "numpy"]
if not BACKENDS:
    pytest.skip(
        "ggml-python not installed (make install, or python scripts/build_ggml.py)",
        allow_module_level=True,
    )

EXACT = 0.0
QUANT_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K]
F32 = np.float32


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(F32)


def write_weights(path: Path, tensors: dict[str, tuple[np.ndarray, Q]]) -> Path:
    writer = GGUFWriter(str(path), "test")
    for name, (w, qtype) in tensors.items():
        if qtype == Q.F32:
            writer.add_tensor(name, w)
        elif qtype == Q.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            raw = quantize(w, qtype)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


WEIGHTS: dict[str, tuple[np.ndarray, Q]] = {
    "w.F32": (rand(48, 64, seed=1), Q.F32),
    "w.F16": (rand(48, 64, seed=2), Q.F16),
    "w.BF16": (rand(48, 64, seed=3), Q.BF16),
    **{f"w.{q.name}": (rand(40, 256, seed=10 + i), q) for i, q in enumerate(QUANT_TYPES)},
    "emb.F32": (rand(20, 64, seed=4), Q.F32),
    "emb.F16": (rand(20, 64, seed=5), Q.F16),
    "emb.Q8_0": (rand(20, 64, seed=6), Q.Q8_0),
    "emb.Q4_K": (rand(20, 256, seed=7), Q.Q4_K),
    "rope_freqs": (np.linspace(1.0, 8.0, 16, dtype=F32), Q.F32),
    # stacked expert weights (E, O, I) for mul_mat_id
    "exps.F32": (rand(4, 24, 64, seed=20), Q.F32),
    "exps.F16": (rand(4, 24, 64, seed=21), Q.F16),
    **{f"exps.{q.name}": (rand(4, 40, 256, seed=30 + i), q) for i, q in enumerate(QUANT_TYPES)},
    # convolution kernels (Cout, C, KH, KW): non-square, a patch embedding's, quantized rows
    "conv.F32": (rand(6, 3, 3, 5, seed=50), Q.F32),
    "conv.F16": (rand(6, 3, 3, 5, seed=51), Q.F16),
    "conv.Q8_0": (rand(4, 2, 2, 32, seed=52), Q.Q8_0),
    "patch.F16": (rand(8, 3, 14, 14, seed=53), Q.F16),
}


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> GGUFFile:
    return open_gguf(write_weights(tmp_path_factory.mktemp("ops") / "w.gguf", WEIGHTS))


# every installed backend (one thread: tiny ops, shared CI cores); ggml also without repacked
# weights and with the composed (exact) GELU on two threads, with flash attention, through
# the scheduler onto a stand-in GPU (a second CPU backend), and on each real GPU unless
# HERD_TEST_NUM_GPU=0
VARIANTS: list[tuple[str, int, dict[str, Any]]] = [(name, 1, {}) for name in BACKENDS]
if "ggml" in BACKENDS:
    VARIANTS += [("ggml", 2, {"repack": False, "exact_gelu": True})]
    VARIANTS += [("ggml", 1, {"flash_attention": True})]
    VARIANTS += [("ggml", 1, {"gpu_ops": True, "stand_in_gpu": True})]
    if NUM_GPU != 0 and ggml_gpus():
        VARIANTS += [("ggml", 1, {"gpu_ops": True, "flash_attention": fa}) for fa in (False, True)]


@pytest.fixture(
    scope="module",
    params=VARIANTS,
    ids=[name + "".join(f"-{k}={v}" for k, v in extra.items()) for name, _, extra in VARIANTS],
)
def backends(request: pytest.FixtureRequest, gguf_file: GGUFFile) -> Any:
    backend = _open(request.param, gguf_file)
    yield backend, NumpyBackend(gguf_file)
    backend.close()


# the variants whose graphs go through ggml's scheduler (stand-in or real GPUs)
SCHEDULED = [v for v in VARIANTS if v[2].get("gpu_ops")]


@pytest.fixture(scope="module", params=SCHEDULED, ids=[str(v[2]) for v in SCHEDULED])
def scheduled(request: pytest.FixtureRequest, gguf_file: GGUFFile) -> Any:
    backend = _open(request.param, gguf_file)
    yield backend, NumpyBackend(gguf_file)
    backend.close()


def _open(variant: tuple[str, int, dict[str, Any]], gguf_file: GGUFFile) -> Any:
    name, threads, fields = variant
    fields, num_gpu = dict(fields), NUM_GPU
    if fields.pop("stand_in_gpu", False):
        fields["device_probe"], num_gpu = stand_in_gpu, -1
    options = BackendOptions(num_thread=threads, num_gpu=num_gpu, **fields)
    backend = open_backend(name, gguf_file, options)
    assert not options.gpu_ops or backend.gpus, "gpu_ops: no GPU in use"
    return backend


def stand_in_gpu() -> list[Any]:
    """ggml's CPU as a "GPU" next to itself: the scheduler splits graphs between them."""
    from herd.ml.backends.ggml.devices import Device, probe_devices

    cpu = next(d for d in probe_devices() if d.info.kind == "cpu")
    return [Device(DeviceInfo("stand-in GPU", "gpu", 1 << 30, 1 << 30), cpu.handle), cpu]


def nmse(got: np.ndarray, want: np.ndarray) -> float:
    want = want.astype(np.float64)
    return float(np.mean((got - want) ** 2) / max(np.mean(want**2), 1e-30))


def run(backend: Any, build: Callable[..., Any], inputs: list[Any]) -> list[np.ndarray]:
    """Build `build(ctx, backend, *input tensors)` and compute its output(s)."""
    with backend.new_context() as ctx:
        args = [ctx.input(a, DType.I32 if a.dtype.kind in "iu" else DType.F32) for a in inputs]
        out = build(ctx, backend, *args)
        return ctx.compute(*(out if isinstance(out, tuple) else (out,)))


def check(backends: Any, build: Callable[..., Any], inputs: list[Any], limit: float) -> None:
    backend, oracle = backends
    got, want = run(backend, build, inputs), run(oracle, build, inputs)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        if limit == EXACT:
            np.testing.assert_array_equal(g, w)
        else:
            assert g.dtype == np.float32
            assert nmse(g, w) < limit, f"nmse {nmse(g, w):.3g} >= {limit:g}"


X = rand(3, 5, 64)  # (B, T, D)
POS = rand(3, 5, 64, seed=9) ** 2 + 0.5


def causal(t: int, s: int) -> np.ndarray:
    return np.where(np.arange(s)[None, :] <= np.arange(t)[:, None] + s - t, 0, -np.inf).astype(F32)


def _permuted(x: Any) -> Any:
    """A non-contiguous view with the same shape as x (3, 5, 64)."""
    return x.reshape(5, 3, 64).permute(1, 0, 2)


# expert routing: 6 tokens, 8 or 4 experts (the rows of a random matrix have no ties)
ROUTER = rand(6, 8, seed=40)
EXPERT_IDS = np.array([[0, 3], [2, 2], [3, 1], [1, 0], [0, 1], [3, 3]], np.int32)  # (T, K)


IMG = rand(2, 3, 9, 11, seed=54)  # (N, C, H, W)


# (id, build, inputs, nmse limit)
OPS: list[tuple[str, Callable[..., Any], list[np.ndarray], float]] = [
    ("add", lambda c, b, x, y: x.add(y), [X, rand(3, 5, 64, seed=1)], 1e-12),
    ("add_bcast_row", lambda c, b, x, y: x.add(y), [X, rand(64, seed=1)], 1e-12),
    ("add_bcast_mid", lambda c, b, x, y: x.add(y), [X, rand(3, 1, 64, seed=1)], 1e-12),
    ("sub", lambda c, b, x, y: x.sub(y), [X, rand(5, 64, seed=1)], 1e-12),
    ("mul", lambda c, b, x, y: x.mul(y), [X, rand(1, 5, 1, seed=1)], 1e-12),
    ("div", lambda c, b, x, y: x.div(y), [X, POS], 1e-12),
    ("add_strided", lambda c, b, x, y: _permuted(x).add(_permuted(y)), [X, POS], 1e-12),
    ("scale", lambda c, b, x: x.scale(0.37), [X], 1e-12),
    ("neg", lambda c, b, x: x.neg(), [X], EXACT),
    ("exp", lambda c, b, x: x.exp(), [X], 1e-10),
    ("sqrt", lambda c, b, x: x.sqrt(), [POS], 1e-12),
    ("tanh", lambda c, b, x: x.tanh(), [X], 1e-10),
    ("sigmoid", lambda c, b, x: x.sigmoid(), [X], 1e-10),
    ("silu", lambda c, b, x: x.silu(), [X], 1e-10),
    ("silu_strided", lambda c, b, x: _permuted(x).silu(), [X], 1e-10),
    ("gelu", lambda c, b, x: x.gelu(), [X], 1e-6),
    ("gelu_erf", lambda c, b, x: x.gelu_erf(), [X], 1e-10),
    ("relu", lambda c, b, x: x.relu(), [X], EXACT),
    ("clamp", lambda c, b, x: x.clamp(-0.5, 0.75), [X], EXACT),
    ("swiglu", lambda c, b, x, y: x.swiglu(y), [X, rand(3, 5, 64, seed=1)], 1e-10),
    ("swiglu_strided", lambda c, b, x, y: _permuted(x).swiglu(y), [X, POS], 1e-10),
    ("geglu", lambda c, b, x, y: x.geglu(y), [X, rand(3, 5, 64, seed=1)], 1e-6),
    ("softmax", lambda c, b, x: x.softmax(), [X], 1e-10),
    (
        "softmax_mask_scale",
        lambda c, b, x, m: x.softmax(m, 0.125),
        [rand(4, 5, 9), causal(5, 9)],
        1e-10,
    ),
    ("softmax_mask_4d", lambda c, b, x, m: x.softmax(m), [rand(2, 4, 5, 9), causal(5, 9)], 1e-10),
    ("softmax_mask_row", lambda c, b, x, m: x.softmax(m), [rand(4, 5, 9), rand(9, seed=1)], 1e-10),
    ("softmax_strided", lambda c, b, x: _permuted(x).softmax(), [X], 1e-10),
    ("sum", lambda c, b, x: x.sum(), [X], 1e-12),
    ("mean", lambda c, b, x: x.mean(), [X], 1e-12),
    ("rms_norm", lambda c, b, x: x.rms_norm(1e-6), [X], 1e-12),
    ("rms_norm_strided", lambda c, b, x: _permuted(x).rms_norm(1e-6), [X], 1e-12),
    ("layer_norm", lambda c, b, x: x.layer_norm(1e-5), [X], 1e-12),
    ("l2_norm", lambda c, b, x: x.l2_norm(1e-6), [X], 1e-12),
    ("matmul_t", lambda c, b, x, y: x.matmul_t(y), [rand(4, 5, 32), rand(4, 7, 32, seed=1)], 1e-12),
    (
        "matmul_t_gqa",
        lambda c, b, x, y: x.matmul_t(y),
        [rand(6, 5, 32), rand(2, 7, 32, seed=1)],
        1e-12,
    ),
    (
        "matmul_t_f16",
        lambda c, b, x, y: x.matmul_t(y.cast(DType.F16)),
        [rand(4, 5, 32), rand(2, 7, 32, seed=1)],
        1e-6,
    ),
    (
        "matmul_t_strided",
        lambda c, b, x, y: x.permute(1, 0, 2).matmul_t(y.permute(1, 0, 2)),
        [rand(5, 4, 32), rand(7, 2, 32, seed=1)],
        1e-12,
    ),
    (
        "attention",
        lambda c, b, q, k, v, m: attention(q, k, v, 0.25, None, m),
        [rand(5, 4, 16), rand(5, 2, 16, seed=1), rand(5, 2, 8, seed=2), causal(5, 5)],
        1e-10,
    ),
    (  # the last layer's: only some rows' queries attend (their mask rows with them)
        "attention_rows",
        lambda c, b, q, k, v, m, i: attention(_rows(q, i), k, v, 0.25, None, m, rows=i),
        [
            rand(5, 4, 16),
            rand(5, 2, 16, seed=1),
            rand(5, 2, 8, seed=2),
            causal(5, 5),
            np.array([1, 4], np.int32),
        ],
        1e-10,
    ),
    (
        "attention_no_mask",
        lambda c, b, q, k, v: attention(q, k, v, 0.25, None, None),
        [rand(5, 4, 16), rand(5, 2, 16, seed=1), rand(5, 2, 8, seed=2)],
        1e-10,
    ),
    *[
        (
            f"attention_cache_{dt.name}",
            lambda c, b, q, k, v, m, dt=dt: attention(q, k.cast(dt), v.cast(dt), 0.125, None, m),
            [rand(7, 8, 64), rand(20, 2, 64, seed=1), rand(20, 2, 64, seed=2), causal(7, 20)],
            limit,
        )
        for dt, limit in ((DType.F16, 2e-6), (DType.Q8_0, 2e-4))
    ],
    ("reshape", lambda c, b, x: x.reshape(15, 8, 8), [X], EXACT),
    ("reshape_infer", lambda c, b, x: x.reshape(-1, 64), [X], EXACT),
    ("reshape_strided", lambda c, b, x: x.permute(2, 0, 1).reshape(64, 15), [X], EXACT),
    ("slice_last", lambda c, b, x: x.slice(-1, 8, 40), [X], EXACT),
    ("slice_mid", lambda c, b, x: x.slice(1, 1, 4), [X], EXACT),
    ("slice_first", lambda c, b, x: x.slice(0, 1, 3), [X], EXACT),
    ("slice_then_op", lambda c, b, x: x.slice(2, 16, 48).silu(), [X], 1e-10),
    # a permuted view's innermost stride is kept (a transposed V cache sliced by cells)
    ("slice_permuted", lambda c, b, x: x.permute(2, 0, 1).slice(0, 8, 40), [X], EXACT),
    ("permute_3d", lambda c, b, x: x.permute(2, 0, 1), [X], EXACT),
    ("permute_4d", lambda c, b, x: x.reshape(3, 5, 8, 8).permute(1, 3, 0, 2), [X], EXACT),
    ("contiguous", lambda c, b, x: x.permute(1, 2, 0).contiguous(), [X], EXACT),
    ("concat_last", lambda c, b, x, y: x.concat(y, -1), [X, rand(3, 5, 16, seed=1)], EXACT),
    ("concat_first", lambda c, b, x, y: x.concat(y, 0), [X, rand(2, 5, 64, seed=1)], EXACT),
    (
        "concat_strided",
        lambda c, b, x, y: x.permute(1, 0, 2).concat(y, 1),
        [X, rand(5, 2, 64, seed=1)],
        EXACT,
    ),
    # a cache's keys and transposed values put together as they are stored (F16, Q8_0):
    # a shared prefix's cells and a prompt's own (nn.attention._attend_pieces)
    (
        "concat_first_f16",
        lambda c, b, x, y: x.cast(DType.F16).concat(y.cast(DType.F16), 0).cast(DType.F32),
        [X, rand(2, 5, 64, seed=1)],
        1e-6,
    ),
    (
        "concat_first_transposed",
        lambda c, b, x, y: (
            x.cast(DType.F16)
            .permute(2, 0, 1)
            .concat(y.cast(DType.F16).permute(2, 0, 1), 0)
            .permute(1, 2, 0)
            .contiguous()
            .cast(DType.F32)
        ),
        [rand(5, 8, 6, seed=2), rand(5, 8, 3, seed=3)],
        1e-6,
    ),
    (
        "concat_first_q8_0",
        lambda c, b, x, y: x.cast(DType.Q8_0).concat(y.cast(DType.Q8_0), 0).cast(DType.F32),
        [X, rand(2, 5, 64, seed=1)],
        1e-4,
    ),
    # a chain of blocks' rows (attention's blocks), a permuted view among them
    (
        "concat_rows",
        lambda c, b, x, y, z: x.concat_rows([y, z.permute(1, 0, 2)]),
        [X, rand(2, 5, 64, seed=1), rand(5, 4, 64, seed=2)],
        EXACT,
    ),
    (
        "concat_rows_2d",
        lambda c, b, x, y: x.reshape(15, 64).concat_rows([y.slice(1, 0, 64), y]),
        [X, rand(4, 64, seed=1)],
        EXACT,
    ),
    ("concat_rows_one", lambda c, b, x: x.concat_rows([]), [X], EXACT),
    ("repeat", lambda c, b, x: x.repeat(6, 5, 128), [X], EXACT),
    ("cast_f16", lambda c, b, x: x.cast(DType.F16), [X], 1e-6),
    ("cast_f16_f32", lambda c, b, x: x.cast(DType.F16).cast(DType.F32).scale(2.0), [X], 1e-6),
    ("cast_i32", lambda c, b, x: x.scale(10.0).cast(DType.I32), [np.round(X * 10) / 10], EXACT),
    ("cast_i32_f32", lambda c, b, i: i.cast(DType.F32), [np.arange(12, dtype=np.int32)], EXACT),
    ("cast_weight", lambda c, b: c.attach(b.weight("w.Q8_0")).cast(DType.F32), [], EXACT),
    *[
        (
            f"get_rows_{table}",
            lambda c, b, i, table=table: b.weight(f"emb.{table}").get_rows(i),
            [np.array([3, 0, 19, 3], np.int32)],
            EXACT,
        )
        for table in ("F32", "F16", "Q8_0", "Q4_K")
    ],
    (
        "get_rows_2d_ids",
        lambda c, b, i: b.weight("emb.F32").get_rows(i),
        [np.array([[3, 0], [19, 3]], np.int32)],
        EXACT,
    ),
    (
        "get_rows_3d_table",
        lambda c, b, x, i: x.get_rows(i),
        [rand(6, 2, 8), np.array([5, 1, 1], np.int32)],
        EXACT,
    ),
    (
        "rope_normal",
        lambda c, b, x, p: x.rope(p, RopeOptions(dims=64)),
        [X.reshape(5, 3, 64), np.array([0, 1, 2, 7, 100], np.int32)],
        1e-10,
    ),
    (
        "rope_neox",
        lambda c, b, x, p: x.rope(p, RopeOptions(dims=64, neox=True, base=5e5)),
        [X.reshape(5, 3, 64), np.array([0, 1, 2, 7, 100], np.int32)],
        1e-10,
    ),
    (
        "rope_partial",
        lambda c, b, x, p: x.rope(p, RopeOptions(dims=32, neox=True)),
        [X.reshape(5, 3, 64), np.array([3, 4, 5, 6, 7], np.int32)],
        1e-10,
    ),
    (
        "rope_freq_factors",
        lambda c, b, x, p: x.rope(p, RopeOptions(dims=32), c.attach(b.weight("rope_freqs"))),
        [X.reshape(5, 3, 64), np.array([0, 1, 2, 300, 4000], np.int32)],
        1e-10,
    ),
    (
        "rope_yarn",
        lambda c, b, x, p: x.rope(
            p, RopeOptions(dims=64, neox=True, freq_scale=0.25, ext_factor=1.0, orig_ctx=64)
        ),
        [X.reshape(5, 3, 64), np.array([0, 1, 60, 130, 250], np.int32)],
        1e-10,
    ),
    (
        "rope_strided",
        lambda c, b, x, p: x.slice(2, 0, 32).rope(p, RopeOptions(dims=32)),
        [X.reshape(5, 3, 64), np.array([0, 1, 2, 3, 4], np.int32)],
        1e-10,
    ),
    # quantized weights: ggml also quantizes the activations (to Q8_0/Q8_1/Q8_K), ~3e-5
    *[
        (
            f"linear_{q.name}",
            lambda c, b, x, q=q: x.linear(b.weight(f"w.{q.name}")),
            [rand(2, 3, 256, seed=5)],
            2e-4,
        )
        for q in QUANT_TYPES
    ],
    ("linear_one_row", lambda c, b, x: x.linear(b.weight("w.Q4_K")), [rand(1, 256, seed=5)], 2e-4),
    ("top_k", lambda c, b, x: x.top_k(3), [ROUTER], EXACT),
    ("top_k_all", lambda c, b, x: x.top_k(8), [ROUTER], EXACT),
    ("top_k_one_row_3d", lambda c, b, x: x.top_k(2), [ROUTER[:1].reshape(1, 1, 8)], EXACT),
    ("top_k_strided", lambda c, b, x: x.permute(1, 0).top_k(2), [ROUTER], EXACT),
    ("take_along", lambda c, b, x, i: x.take_along(i), [ROUTER, EXPERT_IDS], EXACT),
    (
        "take_along_3d",
        lambda c, b, x, i: x.take_along(i),
        [ROUTER.reshape(2, 3, 8), EXPERT_IDS.reshape(2, 3, 2)],
        EXACT,
    ),
    ("take_along_top_k", lambda c, b, x: x.take_along(x.softmax().top_k(3)), [ROUTER], EXACT),
    *[
        (
            f"mul_mat_id_{w}",
            lambda c, b, x, i, w=w: x.mul_mat_id(b.weight(f"exps.{w}"), i),
            [rand(6, 1, 64, seed=41), EXPERT_IDS],
            limit,
        )
        for w, limit in (("F32", 1e-12), ("F16", 1e-6))
    ],
    (
        "mul_mat_id_per_expert_rows",
        lambda c, b, x, i: x.mul_mat_id(b.weight("exps.F32"), i),
        [rand(6, 2, 64, seed=42), EXPERT_IDS],
        1e-12,
    ),
    # quantized experts go to ggml's kernels as they are, like linear's weights
    *[
        (
            f"mul_mat_id_{q.name}",
            lambda c, b, x, i, q=q: x.mul_mat_id(b.weight(f"exps.{q.name}"), i),
            [rand(6, 2, 256, seed=43), EXPERT_IDS],
            2e-4,
        )
        for q in QUANT_TYPES
    ],
    (
        "mul_mat_id_routed",  # the MoE pattern: router top-k picks, then one row per token
        lambda c, b, x, r: x.reshape(6, 1, 256).mul_mat_id(
            b.weight("exps.Q4_K"), r.slice(1, 0, 4).softmax().top_k(2)
        ),
        [rand(6, 256, seed=44), ROUTER],
        2e-4,
    ),
    ("linear_F32", lambda c, b, x: x.linear(b.weight("w.F32")), [rand(7, 64, seed=5)], 1e-12),
    # a weight stored transposed (LoRA's B^T): x @ wt; one row is the decode step's shape
    ("linear_t", lambda c, b, x: x.linear_t(b.weight("w.F32")), [rand(7, 48, seed=6)], 1e-6),
    ("linear_t_row", lambda c, b, x: x.linear_t(b.weight("w.F32")), [rand(1, 48, seed=6)], 1e-6),
    ("linear_F16", lambda c, b, x: x.linear(b.weight("w.F16")), [rand(7, 64, seed=5)], 1e-6),
    ("linear_BF16", lambda c, b, x: x.linear(b.weight("w.BF16")), [rand(7, 64, seed=5)], 2e-5),
    (
        "linear_strided",
        lambda c, b, x: x.permute(1, 0, 2).linear(b.weight("w.Q4_0")),
        [rand(3, 2, 256, seed=5)],
        2e-4,
    ),
    # images (N, C, H, W); F16 kernels are widened to F32 on ggml, so they match as F32
    ("conv2d", lambda c, b, x, w: x.conv2d(w), [IMG, rand(4, 3, 3, 3, seed=1)], 1e-12),
    (
        "conv2d_stride_pad_dilation",
        lambda c, b, x: x.conv2d(b.weight("conv.F32"), (2, 1), (1, 2), (1, 2)),
        [IMG],
        1e-12,
    ),
    ("conv2d_ints", lambda c, b, x: x.conv2d(b.weight("conv.F32"), 3, 2, 2), [IMG], 1e-12),
    ("conv2d_F16", lambda c, b, x: x.conv2d(b.weight("conv.F16"), 2, (0, 1)), [IMG], 1e-12),
    # quantized kernels multiply as linear's weights do (activations quantized too)
    ("conv2d_Q8_0", lambda c, b, x: x.conv2d(b.weight("conv.Q8_0")), [rand(2, 2, 5, 40)], 2e-4),
    (  # a patch embedding: kernel = stride, rows of channels with no copy
        "conv2d_patch_rows",
        lambda c, b, x: x.conv2d(b.weight("patch.F16"), 14).permute(0, 2, 3, 1).reshape(-1, 8),
        [rand(1, 3, 28, 42, seed=55)],
        1e-12,
    ),
    (
        "conv2d_strided_then_op",
        lambda c, b, x: x.permute(0, 1, 3, 2).conv2d(b.weight("conv.F32"), 1, 1).silu(),
        [rand(1, 3, 11, 9, seed=56)],
        1e-10,
    ),
    ("avg_pool2d", lambda c, b, x: x.avg_pool2d(4), [rand(1, 16, 16, 16, seed=57)], 1e-12),
    (  # Gemma 3's projector: encoder rows (P, D) as a (1, D, 8, 8) map, pooled, rows again
        "avg_pool2d_of_rows",
        lambda c, b, x: (
            x.reshape(1, 8, 8, 16)
            .permute(0, 3, 1, 2)
            .avg_pool2d(4)
            .permute(0, 2, 3, 1)
            .reshape(4, 16)
        ),
        [rand(64, 16, seed=58)],
        1e-12,
    ),
    (
        "avg_pool2d_stride_pad",
        lambda c, b, x: x.avg_pool2d((3, 2), (2, 1), (1, 0)),
        [IMG],
        1e-12,
    ),
    (
        "avg_pool2d_after_conv",
        lambda c, b, x, w: x.conv2d(w, 1, 1).avg_pool2d(2, 1, 1),
        [IMG, rand(4, 3, 3, 3, seed=1)],
        1e-12,
    ),
]


@pytest.mark.parametrize(
    ("build", "inputs", "limit"), [op[1:] for op in OPS], ids=[op[0] for op in OPS]
)
def test_op_matches_numpy(
    backends: Any, build: Callable[..., Any], inputs: list[np.ndarray], limit: float
) -> None:
    check(backends, build, inputs, limit)


def test_attention_rows_are_those_of_whole_attention(backends: Any) -> None:
    """`rows` gives exactly the chosen rows of attention over every query."""
    backend, _ = backends
    inputs = [rand(6, 4, 16), rand(6, 2, 16, seed=1), rand(6, 2, 8, seed=2), causal(6, 6)]
    (whole,) = run(backend, lambda c, b, q, k, v, m: attention(q, k, v, 0.25, None, m), inputs)
    rows = np.array([0, 3, 5], np.int32)
    (some,) = run(
        backend,
        lambda c, b, q, k, v, m, i: attention(_rows(q, i), k, v, 0.25, None, m, rows=i),
        [*inputs, rows],
    )
    assert some.shape == (3, 4 * 8)
    np.testing.assert_allclose(some, whole[rows], rtol=1e-5, atol=1e-6)


def _rows(q: Any, rows: Any) -> Any:
    """q (T, H, D) -> the rows' queries (N, H, D), as `query_rows` makes them."""
    t, h, d = q.shape
    return q.reshape(t, h * d).get_rows(rows).reshape(rows.shape[0], h, d)


def test_query_rows_are_the_rows_inputs_and_positions(backends: Any) -> None:
    """The last layer's queries come from the output rows' inputs, roped at their
    positions: the positions stay integers."""
    backend, _ = backends
    x = rand(6, 8)
    pos = np.array([7, 8, 9, 10, 11, 12], np.int32)
    rows = np.array([2, 5], np.int32)
    xq, qpos = run(backend, lambda c, b, x, p, i: query_rows(x, p, i), [x, pos, rows])
    np.testing.assert_array_equal(xq, x[rows])
    np.testing.assert_array_equal(qpos, [9, 12])
    assert np.issubdtype(qpos.dtype, np.integer)
    same = run(backend, lambda c, b, x, p: query_rows(x, p, None), [x, pos])
    np.testing.assert_array_equal(same[0], x)
    np.testing.assert_array_equal(same[1], pos)


def test_table_covers_the_contract() -> None:
    ops = {
        name for name, value in vars(Tensor).items() if callable(value) and not name.startswith("_")
    }
    tested = {op[0].split("_")[0] for op in OPS} | {
        "get_rows",
        "concat_rows",
        "top_k",
        "take_along",
        "mul_mat_id",
        "set_rows",
        "set_columns",
        "gelu_erf",
        "rms_norm",
        "layer_norm",
        "l2_norm",
        "matmul_t",
        "linear_t",
        "avg_pool2d",
    }
    assert ops - tested == set()


CONV_CASES = [  # (x shape, kernel (Cout, C, KH, KW), stride, padding, dilation)
    ((2, 3, 9, 11), (4, 3, 3, 3), 1, 0, 1),
    ((2, 3, 9, 11), (5, 3, 2, 4), (2, 1), (1, 2), (1, 2)),
    ((3, 2, 12, 7), (4, 2, 5, 1), (1, 3), (2, 0), (2, 1)),
    ((1, 3, 28, 42), (8, 3, 14, 14), 14, 0, 1),  # a patch embedding
]


@pytest.mark.parametrize(("xs", "ws", "stride", "padding", "dilation"), CONV_CASES)
def test_conv2d_matches_torch(
    backends: Any,
    xs: tuple[int, ...],
    ws: tuple[int, ...],
    stride: Any,
    padding: Any,
    dilation: Any,
) -> None:
    """Both backends against torch's conv2d (computed in float64) to ~1e-5 relative."""
    torch = pytest.importorskip("torch")
    x, w = rand(*xs, seed=60), rand(*ws, seed=61)
    want = torch.nn.functional.conv2d(
        torch.from_numpy(x).double(), torch.from_numpy(w).double(), None, stride, padding, dilation
    ).numpy()
    for b in backends:
        (got,) = run(b, lambda c, b, x, w: x.conv2d(w, stride, padding, dilation), [x, w])
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("name", ["conv.F32", "conv.F16", "patch.F16"])
def test_conv2d_with_weights_matches_torch(backends: Any, name: str) -> None:
    """A GGUF kernel (a tensor of no context): F16 ones match torch run on the same F16
    values to F32 accuracy, as ggml widens them to F32 (ggml_conv_2d would round the
    patches to F16 as well)."""
    torch = pytest.importorskip("torch")
    x = rand(2, 3, 28, 28, seed=62)
    stride, padding = (14, 0) if name.startswith("patch") else ((1, 2), 1)
    w, qtype = WEIGHTS[name]
    stored = w.astype(np.float16).astype(np.float64) if qtype == Q.F16 else w
    want = torch.nn.functional.conv2d(
        torch.from_numpy(x).double(), torch.from_numpy(stored).double(), None, stride, padding
    ).numpy()
    for b in backends:
        (got,) = run(b, lambda c, b, x: x.conv2d(b.weight(name), stride, padding), [x])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize(
    ("xs", "kernel", "stride", "padding"),
    [
        ((1, 32, 16, 16), 4, None, 0),  # Gemma 3: (1, D, 64, 64) pooled by 4 to 256 tokens
        ((2, 3, 9, 11), (3, 2), (2, 1), (0, 1)),
        ((2, 3, 9, 11), (2, 3), (1, 2), (1, 0)),
        ((1, 4, 7, 7), 3, 2, 1),
    ],
)
def test_avg_pool2d_matches_torch(
    backends: Any, xs: tuple[int, ...], kernel: Any, stride: Any, padding: Any
) -> None:
    """torch's avg_pool2d (count_include_pad): bit for bit on the CPU, where both sum each
    window in float32 row by row as torch does; a GPU kernel may round otherwise."""
    torch = pytest.importorskip("torch")
    x = rand(*xs, seed=63)
    want = torch.nn.functional.avg_pool2d(torch.from_numpy(x), kernel, stride, padding).numpy()
    backend, oracle = backends
    (exact,) = run(oracle, lambda c, b, x: x.avg_pool2d(kernel, stride, padding), [x])
    np.testing.assert_array_equal(exact, want)
    (got,) = run(backend, lambda c, b, x: x.avg_pool2d(kernel, stride, padding), [x])
    if ggml_gpus() and NUM_GPU != 0:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("dtype", "limit"),
    [(DType.F32, EXACT), (DType.F16, 1e-6), (DType.Q8_0, 1e-4), (DType.Q4_0, 1e-2)],
    ids=lambda v: v.name if isinstance(v, DType) else "",
)
def test_set_rows_into_persistent_tensor(backends: Any, dtype: DType, limit: float) -> None:
    """Two passes write rows of a (10, 2, 32) cache; a third reads them back."""
    outs = []
    for b in backends:
        cache = b.alloc((10, 2, 32), dtype)
        for ids, seed in (([3, 7, 1], 1), ([0, 7], 2)):
            with b.new_context() as ctx:
                src = ctx.input(rand(len(ids), 64, seed=seed))
                ctx.forward(cache.set_rows(ctx.input(np.array(ids, np.int32), DType.I32), src))
                ctx.compute()
        with b.new_context() as ctx:
            view = ctx.attach(cache)
            outs.append(ctx.compute(view, view.slice(0, 2, 8).permute(1, 2, 0)))
    for got, want in zip(*outs, strict=True):
        if limit == EXACT:
            np.testing.assert_array_equal(got, want)
        else:
            assert nmse(got, want) < limit


@pytest.mark.parametrize(
    ("dtype", "limit"),
    [(DType.F32, EXACT), (DType.F16, 1e-6)],
    ids=lambda v: getattr(v, "name", ""),
)
def test_set_columns_into_persistent_tensor(backends: Any, dtype: DType, limit: float) -> None:
    """A transposed cache (2, 32, 10): two passes write columns from (T, 2, 32) values
    given as a permuted view; the read back is a view whose rows are contiguous again."""
    outs = []
    for b in backends:
        cache = b.alloc((2, 32, 10), dtype)
        for ids, seed in (([3, 7, 1], 1), ([0, 7], 2)):
            with b.new_context() as ctx:
                src = ctx.input(rand(len(ids), 2, 32, seed=seed)).permute(1, 2, 0)
                ctx.forward(cache.set_columns(ctx.input(np.array(ids, np.int32), DType.I32), src))
                ctx.compute()
        with b.new_context() as ctx:
            view = ctx.attach(cache).slice(2, 1, 8)  # cells 1..7 as (S, 2, 32), then back
            x = ctx.input(rand(2, 4, 7, seed=3))
            mixed = x.matmul_t(view.permute(2, 0, 1).permute(1, 2, 0))
            outs.append(ctx.compute(ctx.attach(cache), mixed))
    (cells, product), (cells_want, product_want) = outs
    if limit == EXACT:  # the written cells are copies of the values: exact
        np.testing.assert_array_equal(cells, cells_want)
    else:
        assert nmse(cells, cells_want) < limit
    # the product through the view sums in its kernel's own order (F32 results 1 ulp apart
    # from NumPy's on some CPUs, e.g. AMD EPYC), so it is held to a tolerance, not bits
    assert nmse(product, product_want) < max(limit, 1e-12)


def test_cache_write_then_read_in_one_pass(backends: Any) -> None:
    """A forward()ed write is visible to reads of the cache later in the same graph."""
    outs = []
    for b in backends:
        cache = b.alloc((6, 8), DType.F16)
        with b.new_context() as ctx:
            ctx.forward(
                cache.set_rows(
                    ctx.input(np.array([4, 1], np.int32), DType.I32), ctx.input(rand(2, 8))
                )
            )
            outs.append(ctx.compute(ctx.attach(cache).slice(0, 0, 5).scale(2.0))[0])
    assert nmse(outs[0], outs[1]) < 1e-6


@pytest.mark.parametrize("keep", [False, True], ids=["shared-buffer", "kept"])
def test_rerun_reuses_the_graph(backends: Any, keep: bool) -> None:
    """New input values through the graph of the last compute, also after other graphs
    (a bigger one in between makes the shared allocator move its buffer: the graph is
    placed again), and in a buffer of its own (`keep`, the runner's decode graphs)."""
    backend, oracle = backends
    build = lambda c, b, x, i: x.linear(b.weight("w.Q8_0")).add(  # noqa: E731
        b.weight("emb.F32").get_rows(i).slice(1, 0, 40)
    )
    steps = [[rand(2, 256, seed=s), np.array([s, 2 * s], np.int32)] for s in range(1, 5)]
    with backend.new_context() as ctx:
        if not isinstance(ctx, GraphReuse):
            pytest.skip(f"{backend.name} has no graph reuse")
        if keep:
            ctx.keep()
        x, i = steps[0]
        got = [ctx.compute(build(ctx, backend, ctx.input(x), ctx.input(i, DType.I32)))[0]]
        got.append(ctx.rerun(*steps[1])[0])
        run(backend, lambda c, b, y: y.linear(b.weight("w.F32")).softmax(), [rand(300, 64)])
        got += [ctx.rerun(*steps[2])[0], ctx.rerun(*steps[3])[0]]
    for g, inputs in zip(got, steps, strict=True):
        assert nmse(g, run(oracle, build, inputs)[0]) < 2e-4


def test_rerun_of_concat_rows_reads_the_new_parts(backends: Any) -> None:
    """`concat_rows` takes its parts as a list: a rerun (MLX replays a tape of the ops,
    their operands by slot) joins the new input's parts, not the first pass's."""
    backend, oracle = backends
    build = lambda c, b, x: x.slice(0, 0, 2).concat_rows(  # noqa: E731
        [x.slice(0, 3, 4).scale(2.0), x.slice(0, 1, 3)]
    )
    steps = [rand(4, 16, seed=s) for s in range(3)]
    with backend.new_context() as ctx:
        if not isinstance(ctx, GraphReuse):
            pytest.skip(f"{backend.name} has no graph reuse")
        got = [ctx.compute(build(ctx, backend, ctx.input(steps[0])))[0]]
        got += [ctx.rerun(x)[0] for x in steps[1:]]
    for g, x in zip(got, steps, strict=True):
        np.testing.assert_array_equal(g, run(oracle, build, [x])[0])


def test_rerun_without_copy_gives_views_until_the_next_run(backends: Any) -> None:
    """`copy=False` (the runner's decode step): the outputs are read-only views of the
    graph's own output, equal to the copied result, overwritten by the next run. Graphs
    the scheduler splits over devices give copies (their output may sit on a GPU)."""
    backend, oracle = backends
    build = lambda c, b, x: x.linear(b.weight("w.Q8_0")).scale(0.5)  # noqa: E731
    steps = [rand(2, 256, seed=s) for s in range(3)]
    with backend.new_context() as ctx:
        if not isinstance(ctx, GraphReuse):
            pytest.skip(f"{backend.name} has no graph reuse")
        ctx.compute(build(ctx, backend, ctx.input(steps[0])))
        view = ctx.rerun(steps[1], copy=False)[0]
        want = run(oracle, build, [steps[1]])[0]
        assert nmse(view, want) < 2e-4
        host = not backend.gpus
        assert view.flags.writeable is not host
        kept = view.copy()
        copied = ctx.rerun(steps[2])[0]
        assert nmse(copied, run(oracle, build, [steps[2]])[0]) < 2e-4
        if host:  # the same memory, now holding the later run's output
            assert nmse(view, copied) < 1e-12 and nmse(view, kept) > 1e-3
        else:
            assert np.array_equal(view, kept)


def test_split_graph_gets_its_sources_back(scheduled: Any) -> None:
    """ggml's scheduler points a node's sources at its own copies when they live on
    another device, and frees those on reset: before a graph is split again, its sources
    must be its own. Simulated on any scheduled backend by re-pointing a source."""
    backend, oracle = scheduled
    from herd.ml.backends.ggml import _lib as L

    build = lambda c, b, x, y: x.scale(3.0).add(y.scale(5.0))  # noqa: E731
    first, second = (
        [rand(2, 64, seed=1), rand(2, 64, seed=2)],
        [rand(2, 64, seed=3), rand(2, 64, seed=4)],
    )
    with backend.new_context() as ctx:
        got = [ctx.compute(build(ctx, backend, ctx.input(first[0]), ctx.input(first[1])))[0]]
        g = ctx.graph
        add = L.ggml_graph_node(g, L.ggml_graph_n_nodes(g) - 1)
        srcs = bytearray(L.tensor_srcs(add))
        ptr = L.PTR
        srcs[0:ptr] = srcs[ptr : 2 * ptr]  # add(x', y') reads add(y', y'), as a stale copy would
        L.set_tensor_srcs(add, bytes(srcs))
        run(backend, lambda c, b, z: z.scale(2.0), [rand(300, 64)])  # another placement
        got.append(ctx.rerun(*second)[0])
    for g_out, inputs in zip(got, (first, second), strict=True):
        assert nmse(g_out, run(oracle, build, inputs)[0]) < 1e-10


def test_compute_twice_in_one_context(backends: Any) -> None:
    backend, _ = backends
    with backend.new_context() as ctx:
        x = ctx.input(rand(4, 64))
        y = x.silu()
        first = ctx.compute(y)[0]
        run(backend, lambda c, b, z: z.scale(2.0), [rand(500, 64)])
        again, z = ctx.compute(y, y.scale(3.0))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(z, 3 * first, rtol=1e-6)


@pytest.mark.skipif("ggml" not in BACKENDS, reason="ggml-python not installed")
def test_repack_copies_only_what_linear_uses(gguf_file: GGUFFile) -> None:
    backend = open_backend("ggml", gguf_file, BackendOptions(num_thread=1, repack=True))
    run(backend, lambda c, b, x: x.linear(b.weight("w.Q4_0")), [rand(2, 256)])
    q4 = backend.weight("w.Q4_0").p
    assert backend.packed[q4] != 0  # decided on first use (a copy where the CPU has a layout)
    run(backend, lambda c, b, i: b.weight("emb.Q8_0").get_rows(i), [np.array([1], np.int32)])
    assert backend.packed[backend.weight("emb.Q8_0").p] == 0  # only gathered: not copied
    backend.close()


def test_ggml_widens_f16_weights_that_multiply_many_rows(gguf_file: GGUFFile) -> None:
    """On a CPU without F16 arithmetic an F16 weight times a prompt's (or an image's) rows
    is widened to F32 first (matmul.py: ggml's F16 GEMM was ~1.5x slower): nothing is
    rounded to F16 on the way. A decode step's few rows keep F16 activations."""
    backend = open_backend("ggml", gguf_file, BackendOptions(num_thread=1))
    try:
        if not backend.widen_f16:
            pytest.skip("this CPU has F16 vector arithmetic: ggml keeps its F16 kernels")
        oracle = NumpyBackend(gguf_file)
        for rows, low, high in ((96, 0.0, 1e-11), (7, 1e-9, 1e-6)):
            x = [rand(rows, 64, seed=5)]
            build = lambda c, b, x: x.linear(b.weight("w.F16"))  # noqa: E731
            err = nmse(run(backend, build, x)[0], run(oracle, build, x)[0])
            assert low <= err < high, (rows, err)
    finally:
        backend.close()


def test_weights_keep_their_types(backends: Any) -> None:
    backend, _ = backends
    assert backend.weight("w.Q8_0").dtype == DType.Q8_0
    assert backend.weight("w.F16").dtype == DType.F16
    assert backend.weight("w.Q4_K").dtype == DType.OTHER
    assert backend.weight("w.Q4_K").shape == (40, 256)
    assert "cpu" in [d.kind for d in backend.devices()]


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = write_weights(tmp_path / "t.gguf", {"w": (rand(32, 64), Q.F32)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(GGUFError, match="runs past the end of the file"):
        open_gguf(path)


@pytest.mark.parametrize("cut", ["end", "length"])
def test_string_array_past_the_end_is_refused(tmp_path: Path, cut: str) -> None:
    """A vocabulary cut short by the end of the file, or one string's length corrupted
    to 2^60: a clear error, read no further than the file."""
    writer = GGUFWriter(str(tmp_path / "s.gguf"), "test")
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(1000)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    data = bytearray((tmp_path / "s.gguf").read_bytes())
    at = data.index(b"tok500") - 8  # its u64 length
    if cut == "end":
        data = data[: at + 10]
    else:
        data[at : at + 8] = (1 << 60).to_bytes(8, "little")
    (tmp_path / "s.gguf").write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=r"'tokenizer.ggml.tokens'.* runs past the end of the file"):
        open_gguf(tmp_path / "s.gguf")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_backend_refuses_tensor_past_the_end(tmp_path: Path, backend_name: str) -> None:
    """Even if a reader let it through, the backend never maps bytes past the file."""
    g = open_gguf(write_weights(tmp_path / "t.gguf", {"w": (rand(32, 64), Q.F32)}))
    info = g.tensors["w"]
    bad = dataclasses.replace(g, tensors={"w": dataclasses.replace(info, offset=g.file_size - 64)})
    with pytest.raises(GGUFError, match="runs past the end of the file"):
        open_backend(backend_name, bad).weight("w")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_unsupported_type_is_refused(tmp_path: Path, backend_name: str) -> None:
    """Q8_K is a valid GGUF type that ggml uses only for activations: no kernel reads it."""
    raw = np.zeros((4, 292), np.uint8)
    writer = GGUFWriter(str(tmp_path / "q.gguf"), "test")
    writer.add_tensor("w", raw, raw_shape=raw.shape, raw_dtype=Q.Q8_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises((GGUFError, BackendError), match="Q8_K"):
        open_backend(backend_name, open_gguf(tmp_path / "q.gguf")).weight("w")
