"""What is particular to the ONNX Runtime backend: its session cache (graphs with symbolic
shapes: one session for every prompt and context length), its execution providers, and
cache writes read back in the same pass. Its ops, architectures and parity run in the
shared suites (test_ops, conformance, parity)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from herd import envconfig  # noqa: E402
from herd.errors import BackendError  # noqa: E402
from herd.gguf import open_gguf  # noqa: E402
from herd.ml import BackendOptions, DType, open_backend  # noqa: E402
from herd.ml.backends.numpy import NumpyBackend  # noqa: E402
from herd.models import load_model  # noqa: E402
from herd.options import Options  # noqa: E402
from herd.runner import Runner  # noqa: E402


class Letters:
    """Token i is one letter; nothing ends generation."""

    def piece(self, id: int, special: bool = False) -> bytes:
        return bytes([97 + id % 26])

    def is_eog(self, id: int) -> bool:
        return False


class Numbered(Letters):
    """Each piece numbered: a random model stuck on one token still decodes every step
    asked (the runner ends an answer repeating one piece 31 times, as Ollama)."""

    def __init__(self) -> None:
        self.n = 0

    def piece(self, id: int, special: bool = False) -> bytes:
        self.n += 1
        return f"{id}.{self.n} ".encode()


def _chat(
    path: Path, backend_name: str, requests: list[tuple[int, int]]
) -> tuple[list[list[int]], list[int]]:
    """Greedy tokens of each (prompt length, steps) request, one after the other in one
    runner (prompts that share no prefix), and the sessions built after each."""
    g = open_gguf(path)
    backend = open_backend(backend_name, g)
    model = load_model(g.config(), backend)
    runner = Runner(model, backend, Numbered(), Options(num_ctx=512), model.context_length)
    tokens, sessions = [], []
    for i, (n, steps) in enumerate(requests):
        prompt = [(1 + i + 7 * j) % 64 for j in range(n)]
        events = list(runner.generate(prompt, Options(temperature=0, num_predict=steps)))
        tokens.append(list(events[-1].tokens))
        sessions.append(getattr(backend, "sessions_created", 0))
    return tokens, sessions


def test_one_session_for_every_prompt_and_context_length(tiny_llama_path: Path) -> None:
    """Prompts of 3, 7 and 19 tokens, the last decoding 380 steps (past the cache's
    256-cell padding, and 143 steps on): two sessions, the prompt's and the decode
    step's, both built by the first request, and the NumPy oracle's tokens."""
    requests = [(3, 4), (7, 4), (19, 380)]
    tokens, sessions = _chat(tiny_llama_path, "onnx", requests)
    assert sessions[0] <= 2 and sessions[-1] == sessions[0], sessions
    assert [len(t) for t in tokens] == [4, 4, 380]
    want, _ = _chat(tiny_llama_path, "numpy", requests)
    assert tokens == want


def test_prompts_attended_in_blocks_share_a_session(tiny_llama_path: Path) -> None:
    """Prompts over 128 tokens attend in blocks of 128 query rows (kvcache.causal): the
    blocks' rows and cells are graph inputs, so 150, 200, 230 and 129 tokens run one
    prompt session."""
    requests = [(150, 2), (200, 2), (230, 2), (129, 2)]
    tokens, sessions = _chat(tiny_llama_path, "onnx", requests)
    assert sessions[-1] == sessions[0] <= 2, sessions
    want, _ = _chat(tiny_llama_path, "numpy", requests)
    assert tokens == want


def _shape_ops(backend: object, t: int) -> list[np.ndarray]:
    """Ops whose shapes derive from the input's length t: reshapes (one with -1), a
    slice with concrete bounds and one to the end, a concat, a repeat and a rope."""
    from herd.ml.base import RopeOptions

    rng = np.random.default_rng(t)
    x_host = rng.standard_normal((t, 8)).astype(np.float32)
    with backend.new_context() as ctx:  # type: ignore[attr-defined]
        x = ctx.input(x_host)
        pos = ctx.input(np.arange(5, 5 + t, dtype=np.int32), DType.I32)
        heads = x.reshape(x.shape[0], 2, 4).rope(pos, RopeOptions(dims=4, base=10000.0))
        flat = heads.reshape(-1, 4)  # (2t, 4)
        tail = flat.slice(0, 1, flat.shape[0])  # (2t - 1, 4)
        mid = flat.slice(0, 1, 2).repeat(3, 4)
        both = tail.concat(mid, 0).scale(0.5)  # (2t + 2, 4)
        return ctx.compute(both.reshape(both.shape[0] // 2, 8), flat.slice(0, 0, 2))


def test_shape_arithmetic_runs_one_session(tiny_llama_path: Path) -> None:
    g = open_gguf(tiny_llama_path)
    backend = open_backend("onnx", g)
    for t in (3, 5, 1, 9):
        got = _shape_ops(backend, t)
        want = _shape_ops(NumpyBackend(g), t)
        assert [a.shape for a in got] == [w.shape for w in want]
        for a, w in zip(got, want, strict=True):
            np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-6)
    assert backend.sessions_created == 1  # type: ignore[attr-defined]


def test_dim_expressions_match_python_for_every_size() -> None:
    """A Dim's graph value equals Python's arithmetic on it, negative floor division
    included, for sizes other than the one it was recorded with."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from herd.ml.backends.onnx.dims import Dim
    from herd.ml.backends.onnx.graph import Graph

    g = Graph()
    g.declare("x", TensorProto.FLOAT, (Dim(5, ("shape", "x", 0)),))
    t = Dim(5, ("shape", "x", 0))
    exprs = [t + 3, 2 * t - 1, -(-t // 4) * 4, (t - 7) // 3, 10 // (t + 1), -t + 1]
    outs = []
    for i, e in enumerate(exprs):
        assert isinstance(e, Dim), e
        name = f"out{i}"
        g.nodes.append(helper.make_node("Identity", [g.const([e])], [name]))
        outs.append((name, TensorProto.INT64, (1,)))
    sess = ort.InferenceSession(g.model(outs).SerializeToString())
    for n in (5, 0, 1, 2, 8, 13):
        got = [int(v[0]) for v in sess.run(None, {"x": np.zeros(n, np.float32)})]
        want = [n + 3, 2 * n - 1, -(-n // 4) * 4, (n - 7) // 3, 10 // (n + 1), -n + 1]
        assert got == want, (n, got, want)


def _from_env() -> BackendOptions:
    """The options an entry point hands the backend: HERD_ONNX_* read by envconfig."""
    return BackendOptions(**envconfig.backend_options())


def test_provider_not_installed_names_the_available_ones(
    tiny_llama_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERD_ONNX_PROVIDERS", "cuda,cpu")
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is installed here: there is no missing provider to name")
    with pytest.raises(BackendError, match="'cuda' is not installed; available: .*CPUExecution"):
        open_backend("onnx", open_gguf(tiny_llama_path), _from_env())


def test_provider_by_short_name(tiny_llama_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERD_ONNX_PROVIDERS", "cpu")
    backend = open_backend("onnx", open_gguf(tiny_llama_path), _from_env())
    assert backend.providers == ["CPUExecutionProvider"]  # type: ignore[attr-defined]
    assert backend.devices()[0].kind == "cpu"


def _write_then_read(backend: object, ids: list[int], lo: int, hi: int) -> list[np.ndarray]:
    src = np.random.default_rng(0).standard_normal((len(ids), 2, 4)).astype(np.float32)
    cache = backend.alloc((10, 2, 4), DType.F32)  # type: ignore[attr-defined]
    with backend.new_context() as ctx:  # type: ignore[attr-defined]
        before = ctx.attach(cache).slice(0, lo, hi)  # attached before the write: sees none
        ctx.forward(cache.set_rows(ctx.input(np.array(ids, np.int32), DType.I32), src_t(ctx, src)))
        after = ctx.attach(cache).slice(0, lo, hi).scale(2.0)
        whole = ctx.attach(cache).scale(1.0)  # any other read: the whole buffer, written
        out = ctx.compute(before, after, whole)
    return out


def src_t(ctx: object, src: np.ndarray) -> object:
    return ctx.input(src)  # type: ignore[attr-defined]


def test_cache_writes_are_read_back_in_the_same_pass(tiny_llama_path: Path) -> None:
    g = open_gguf(tiny_llama_path)
    got = _write_then_read(open_backend("onnx", g), [7, 3], 2, 9)
    want = _write_then_read(NumpyBackend(g), [7, 3], 2, 9)
    # numpy reads eagerly: its "before" view shares the written buffer; ours is a copy
    np.testing.assert_array_equal(got[0], np.zeros_like(got[0]))
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])


def test_write_outside_the_read_rows_is_refused(tiny_llama_path: Path) -> None:
    """The read slice takes the written rows by index minus its start: a write that
    falls outside it is refused on the host, never scattered out of bounds."""
    backend = open_backend("onnx", open_gguf(tiny_llama_path))
    with pytest.raises(BackendError, match=r"outside the rows \[2, 5\)"):
        _write_then_read(backend, [7, 3], 2, 5)


def test_rerun_checks_the_written_rows_too(tiny_llama_path: Path) -> None:
    backend = open_backend("onnx", open_gguf(tiny_llama_path))
    cache = backend.alloc((8, 4), DType.F16)
    with backend.new_context() as ctx:
        ids = ctx.input(np.array([1], np.int32), DType.I32)
        ctx.forward(cache.set_rows(ids, ctx.input(np.ones((1, 4), np.float32))))
        (first,) = ctx.compute(ctx.attach(cache).slice(0, 0, 4))
        assert first[1].tolist() == [1, 1, 1, 1]
        (again,) = ctx.rerun(np.array([2], np.int32), np.full((1, 4), 3, np.float32))
        assert again[2].tolist() == [3, 3, 3, 3] and again[1].tolist() == [1, 1, 1, 1]
        with pytest.raises(BackendError, match="outside the rows"):
            ctx.rerun(np.array([6], np.int32), np.ones((1, 4), np.float32))
    assert backend.sessions_created == 1


def test_contexts_sharing_a_session_rerun_into_their_own_buffers(tiny_llama_path: Path) -> None:
    """A session keeps its outputs bound between runs (60 bindings a decode step saved);
    another context's plan on the same session binds its own again."""
    backend = open_backend("onnx", open_gguf(tiny_llama_path))
    ctxs = [backend.new_context() for _ in range(2)]
    for i, ctx in enumerate(ctxs):
        (out,) = ctx.compute(ctx.input(np.full((2, 3), i, np.float32)).scale(2.0))
        assert out.tolist() == [[2.0 * i] * 3] * 2
    assert backend.sessions_created == 1  # one graph, one session
    seen = []
    for step in range(3):
        for i, ctx in enumerate(ctxs):
            (out,) = ctx.rerun(np.full((2, 3), 10 * step + i, np.float32), copy=False)
            seen.append(out)
            assert out.tolist() == [[2.0 * (10 * step + i)] * 3] * 2
    assert seen[-1] is not seen[-2] and not np.shares_memory(seen[-1], seen[-2])
    for ctx in ctxs:
        ctx.close()


@pytest.mark.parametrize(
    ("ids", "rows"),
    [([5], slice(5, 6)), ([2, 3], slice(2, 4)), ([2, 3, 4, 5], slice(2, 6)), ([7, 3], None),
     ([3, 4, 6], None), ([4, 4], None), ([2, 4, 3], None), ([], None)],
)  # fmt: skip
def test_written_rows_are_a_slice_only_where_consecutive(
    ids: list[int], rows: slice | None
) -> None:
    from herd.ml.backends.onnx.context import _rows

    got = _rows(np.array(ids, np.int64))
    if rows is None:
        assert isinstance(got, np.ndarray) and got.tolist() == ids
    else:
        assert got == rows
    buf, want = np.zeros(10), np.zeros(10)
    buf[got] = np.arange(len(ids)) + 1.0
    want[np.array(ids, np.int64)] = np.arange(len(ids)) + 1.0
    np.testing.assert_array_equal(buf, want)


def _weights_file(path: Path) -> Path:
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter

    from herd.gguf.quants import quantize

    writer = GGUFWriter(str(path), "test")
    rng = np.random.default_rng(3)
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q6_K, Q.TQ2_0):
        raw = quantize(rng.standard_normal((48, 256)).astype(np.float32), qtype)
        writer.add_tensor(f"w.{qtype.name}", raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("name", ["w.Q4_0", "w.Q4_1", "w.Q8_0", "w.Q5_0", "w.Q6_K", "w.TQ2_0"])
def test_which_weights_stay_quantized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Q4_0, Q4_1, Q8_0, Q5_0 and Q6_K run as MatMulNBits with int8 activations, as
    llama.cpp; TQ2_0 is dequantized; HERD_ONNX_DEQUANTIZE=1 dequantizes every one (the
    reference)."""
    g = open_gguf(_weights_file(tmp_path / "q.gguf"))
    x = np.random.default_rng(4).standard_normal((3, 256)).astype(np.float32)
    oracle = NumpyBackend(g)
    with oracle.new_context() as ctx:
        (want,) = ctx.compute(ctx.input(x).linear(oracle.weight(name)))
    for dequantize in ("0", "1"):
        monkeypatch.setenv("HERD_ONNX_DEQUANTIZE", dequantize)
        backend = open_backend("onnx", g, _from_env())
        w = backend.weight(name)
        kept = dequantize == "0" and name != "w.TQ2_0"
        assert (w.q is not None) is kept  # type: ignore[attr-defined]
        with backend.new_context() as ctx:
            (got,) = ctx.compute(ctx.input(x).linear(w))
        err = float(np.mean((got - want) ** 2) / np.mean(want**2))
        exact = not kept
        assert err < (1e-12 if exact else 2e-4), f"{name} dequantize={dequantize}: nmse {err}"


def test_a_type_without_an_exact_form_is_dequantized_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TQ2_0 has no MatMulNBits form here: it becomes float32, and the log says so once
    for its type; the types that stay in their blocks are not named."""
    import logging

    from herd.ml.backends.onnx import backend as onnx_backend

    backend = open_backend("onnx", open_gguf(_weights_file(tmp_path / "q.gguf")))
    with caplog.at_level(logging.INFO, logger=onnx_backend.__name__):
        for name in ("w.TQ2_0", "w.Q6_K", "w.TQ2_0", "w.Q5_0"):
            backend.weight(name)
    said = [r.message for r in caplog.records if "dequantized to float32" in r.message]
    assert said == ["onnx: TQ2_0 weights dequantized to float32 at load"], said


def _table_file(path: Path) -> tuple[Path, int]:
    """A Q8_0 table of 40 MB (GatherBlockQuantized reads it as it is: no prepacked copy)."""
    from gguf import GGMLQuantizationType as Q

    from herd.gguf.quants import quantize
    from herd.gguf.writer import write_gguf

    rows, dim = 20480, 2048
    w = np.random.default_rng(5).standard_normal((rows, dim)).astype(np.float32)
    return write_gguf(path, "test", {}, [("t", quantize(w, Q.Q8_0), Q.Q8_0)]), rows * dim


def _three_sessions(backend) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """Rows of table t through three different graphs (three sessions)."""
    out = []
    for k in (1.0, 2.0, 3.0):
        with backend.new_context() as ctx:
            rows = backend.weight("t").get_rows(ctx.input([0, 7, 20479], DType.I32))
            (got,) = ctx.compute(rows.scale(k))
            out.append(got / k)
    return out


def test_sessions_read_the_quantized_weights_not_copies(tmp_path: Path) -> None:
    """Every session reads the backend's quantized arrays (add_initializer): three sessions
    over a 40 MB table add far less than one copy of it (copied, as add_external_initializers
    does, they added a copy each: +132 MB measured)."""
    import gc

    import psutil

    path, table_bytes = _table_file(tmp_path / "t.gguf")
    backend = open_backend("onnx", open_gguf(path), BackendOptions(onnx_cache=False))
    backend.weight("t")  # the table in MatMulNBits' form, before the measure
    gc.collect()
    before = psutil.Process().memory_info().rss
    outs = _three_sessions(backend)
    grown = psutil.Process().memory_info().rss - before
    assert backend.sessions_created == 3 and backend.share
    assert grown < table_bytes / 2, f"3 sessions grew RSS by {grown >> 20} MB"
    for got in outs[1:]:
        np.testing.assert_array_equal(got, outs[0])


def test_an_onnxruntime_that_cannot_share_them_copies_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the shared form does not build (here: the placeholder file ORT checks for is
    gone), the session is built again with copies, with a log line, and later ones copy."""
    import logging

    from herd.ml.backends.onnx import backend as onnx_backend

    path, _ = _table_file(tmp_path / "t.gguf")
    want = _three_sessions(open_backend("onnx", open_gguf(path), BackendOptions(onnx_cache=False)))
    monkeypatch.setattr(onnx_backend, "_placeholder", lambda: str(tmp_path / "missing"))
    backend = open_backend("onnx", open_gguf(path), BackendOptions(onnx_cache=False))
    with caplog.at_level(logging.INFO, logger=onnx_backend.__name__):
        got = _three_sessions(backend)
    assert not backend.share and backend.sessions_created == 3
    assert sum("does not share initializers" in r.message for r in caplog.records) == 1
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_first_weight_asked_for_converts_them_all_on_the_load_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asking for one quantized weight converts every 2-D one that stays quantized on the
    backend's threads (a model asks for them one by one; the conversion is most of a
    load): each weight then gets its own blocks, as converting it alone gives them."""
    import threading

    from herd.ml.backends.onnx import quant

    g = open_gguf(_weights_file(tmp_path / "q.gguf"))
    where: dict[str, str] = {}
    convert = quant.matmul_nbits

    def spy(raw, qtype, shape):  # type: ignore[no-untyped-def]
        where[qtype.name] = threading.current_thread().name
        return convert(raw, qtype, shape)

    monkeypatch.setattr(quant, "matmul_nbits", spy)
    backend = open_backend("onnx", g, BackendOptions(num_thread=2))
    weights = {name: backend.weight(name) for name in ("w.Q8_0", "w.Q4_0", "w.Q4_1")}
    assert set(where) == {"Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q6_K"}, where  # TQ2_0: dequantized
    assert all(name.startswith("herd-onnx-load") for name in where.values()), where
    for name, w in weights.items():
        info = g.tensors[name]
        alone = convert(g.raw(name), info.type, tuple(info.shape))
        np.testing.assert_array_equal(w.q.b, alone.b)  # type: ignore[attr-defined]
        np.testing.assert_array_equal(w.q.scales, alone.scales)  # type: ignore[attr-defined]
