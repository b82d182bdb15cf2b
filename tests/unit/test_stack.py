"""Linears of one x as one matmul (`nn.Stack`, `Backend.stack`) and the adapters of one
group sharing one A (`nn.lora`): the same outputs as each on its own, computed once per x."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from herd.gguf import open_gguf
from herd.gguf.writer import write_gguf
from herd.ml import BackendOptions, DType, open_backend
from herd.models import Batch, batch_inputs, load_model
from herd.nn import Linear, Stack
from herd.nn.lora import Adapted

RNG = np.random.default_rng(7)
NAMES = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"]


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def weights_file(path: Path, v_type: Q = Q.Q8_0) -> tuple[Path, dict[str, np.ndarray]]:
    """q (64, 64), k and v (32, 64) quantized; v of another type where asked."""
    arrays = {NAMES[0]: f32(64, 64), NAMES[1]: f32(32, 64), NAMES[2]: f32(32, 64)}
    tensors, exact = [], {}
    for name, a in arrays.items():
        t = v_type if name == NAMES[2] else Q.Q8_0
        raw = quantize(a, t)
        tensors.append((name, raw, t))
        exact[name] = dequantize(raw, t).reshape(a.shape)
    return write_gguf(path, "llama", {}, tensors), exact


@pytest.fixture
def mlx() -> None:
    pytest.importorskip("mlx.core", reason="the mlx extra is not installed")


def test_mlx_stacks_rows_exactly_and_multiplies_once(tmp_path: Path, mlx: None) -> None:
    """The stacked Q8_0 weight holds the three row after row, bit for bit (its product
    with the identity is each weight's own), and one matmul over it gives each linear's
    own product; each name is then a view of it."""
    path, exact = weights_file(tmp_path / "w.gguf")
    backend = open_backend("mlx", open_gguf(path), BackendOptions(num_thread=2))
    try:
        stacked = backend.stack(NAMES)
        assert stacked is not None and stacked.shape == (128, 64)
        x = f32(3, 64)
        with backend.new_context() as ctx:
            eye, xs = ctx.input(np.eye(64, dtype=np.float32)), ctx.input(x)
            rows, whole, *each = ctx.compute(
                eye.linear(stacked), xs.linear(stacked),
                *(t.linear(backend.weight(n)) for n in NAMES for t in (eye, xs)),
            )  # fmt: skip
        np.testing.assert_array_equal(rows, np.concatenate(each[0::2], axis=1))
        np.testing.assert_allclose(whole, np.concatenate(each[1::2], axis=1), rtol=1e-6, atol=1e-6)
        # and those rows are the file's weights (to Q8_0's rounding of the identity)
        want = np.concatenate([exact[n] for n in NAMES])
        np.testing.assert_allclose(rows.T, want, rtol=1e-3, atol=1e-3)
    finally:
        backend.close()


def test_mlx_does_not_stack_mixed_forms(tmp_path: Path, mlx: None) -> None:
    """Q4_K_M-style files keep V in another type (here dense F16): no stack, each linear
    on its own; ggml stacks nothing (measured slower on prompts)."""
    path, _ = weights_file(tmp_path / "w.gguf", v_type=Q.F16)
    assert open_backend("ggml", open_gguf(path), BackendOptions()).stack(NAMES) is None
    backend = open_backend("mlx", open_gguf(path), BackendOptions(num_thread=2))
    try:
        assert backend.stack(NAMES) is None
        assert backend.stack(NAMES[:2]) is not None
    finally:
        backend.close()


class Recorded:
    """A stand-in tensor that records the matmuls made from it."""

    def __init__(self, shape: tuple[int, ...], log: list[str], name: str = "x") -> None:
        self.shape, self.log, self.name = shape, log, name

    def linear(self, w: Recorded) -> Recorded:
        self.log.append(f"{self.name}@{w.name}")
        return Recorded(self.shape[:-1] + (w.shape[0],), self.log, f"({self.name}@{w.name})")

    def slice(self, axis: int, start: int, stop: int) -> Recorded:
        return Recorded(self.shape[:-1] + (stop - start,), self.log, f"{self.name}[{start}:{stop}]")


def test_stack_computes_once_per_x() -> None:
    """q, k and v called on one x cost one matmul; a member called on another x (the last
    layer's q on the output rows only) gets one of its own, and slices are each's rows."""
    log: list[str] = []
    linears = [Linear(Recorded((n, 8), log, f"w{n}")) for n in (8, 4, 4)]  # type: ignore[arg-type]
    for m, name in zip(linears, NAMES, strict=True):
        m.name = name
    stack = Stack(Recorded((16, 8), log, "W"), linears)  # type: ignore[arg-type]
    x, xq = Recorded((5, 8), log), Recorded((1, 8), log, "xq")
    outs = [m.forward(x) for m in linears]  # type: ignore[arg-type]
    assert log == ["x@W"]
    assert stack.memo.x is None and stack.memo.y is None  # the last member let go
    assert [o.name for o in outs] == ["(x@W)[0:8]", "(x@W)[8:12]", "(x@W)[12:16]"]
    assert linears[0].forward(xq).shape == (1, 8)  # type: ignore[arg-type]
    assert log == ["x@W", "xq@W"]
    assert stack.rows == [(0, 8), (8, 12), (12, 16)]


@pytest.mark.parametrize("backend_name", ["numpy", "ggml", "mlx"])
def test_grouped_adapters_equal_each_on_its_own(tiny_llama_path: Path, backend_name: str) -> None:
    """Adapters on q and v (PEFT's default targets) but not k: q and v share one A (the
    two stacked, computed once per x), each multiplies its own rank rows by its B^T
    (`linear_t`), and k gets no delta, on NumPy, ggml and MLX (where q, k and v are one
    stacked matmul)."""
    if backend_name == "mlx":
        pytest.importorskip("mlx.core", reason="the mlx extra is not installed")
    g = open_gguf(tiny_llama_path)
    aq, bq, av, bv = f32(4, 32), f32(32, 4), f32(2, 32), f32(16, 2)
    factors = {"blk.0.attn_q.weight": [(aq, bq, 0.5)], "blk.0.attn_v.weight": [(av, bv, 2.0)]}
    wrapped = Adapted(open_backend(backend_name, g, BackendOptions(num_thread=1)), factors)
    model = load_model(g.config(), wrapped)
    attn = model.blk[0].attn
    lq, lv = wrapped.lora("blk.0.attn_q.weight"), wrapped.lora("blk.0.attn_v.weight")
    assert lq is not None and lv is not None and lq.a is lv.a  # one A for the group
    assert lq.a.shape == (6, 32) and (lq.ranks, lv.ranks) == ((0, 4), (4, 6))
    assert (lq.bt.shape, lv.bt.shape) == ((4, 32), (2, 16))
    x = f32(3, 32)
    with wrapped.new_context() as ctx:
        xs = ctx.input(x)
        q, k, v = ctx.compute(*(m.forward(xs) for m in (attn.attn_q, attn.attn_k, attn.attn_v)))
    w = {n: g.raw(f"blk.0.attn_{n}.weight").view(np.float32).reshape(-1, 32) for n in "qkv"}
    np.testing.assert_allclose(q, x @ w["q"].T + 0.5 * x @ (bq @ aq).T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(k, x @ w["k"].T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(v, x @ w["v"].T + 2.0 * x @ (bv @ av).T, rtol=1e-4, atol=1e-4)
    wrapped.close()


def test_stacked_model_equals_unstacked(tiny_llama_path: Path, mlx: None) -> None:
    """The whole tiny llama on MLX with q/k/v and gate/up stacked (its arrays
    concatenated, the names then views of them) gives NumPy's logits (nothing stacked
    there) for a prompt and a decode step."""
    stacking = "mlx"
    g = open_gguf(tiny_llama_path)
    outs = []
    for name in ("numpy", stacking):
        model = load_model(g.config(), open_backend(name, g, BackendOptions(num_thread=2)))
        if name == stacking:
            assert model.blk[0].attn.attn_q.weight is model.backend.weight("blk.0.attn_q.weight")
            assert model.blk[0].attn.attn_q.stack is not None
            assert model.blk[0].mlp.ffn_gate.stack is not None
        model.cache.init(model.backend, DType.F32, 1, 64, 64)
        logits = []
        for batch in (Batch.single([1, 2, 3, 4], outputs="all"), Batch.single([5], 4)):
            with model.backend.new_context() as ctx:
                model.cache.start_forward(ctx, batch)
                logits.append(ctx.compute(model.forward(ctx, batch_inputs(ctx, batch)))[0])
        outs.append(np.concatenate(logits))
        model.backend.close()
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-4)
