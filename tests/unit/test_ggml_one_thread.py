"""Every ggml graph is computed on one thread, whichever thread asks (herd.ml.backends.ggml.
one_thread says why: a second OpenMP team halves a 2-core machine's decode)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from gguf import GGUFWriter

from herd.gguf.reader import open_gguf
from herd.ml import BackendOptions, DType, available_backends, open_backend

if "ggml" not in available_backends():
    pytest.skip("ggml-python not installed (make install)", allow_module_level=True)

from herd.ml.backends.ggml import _lib as L  # noqa: E402
from herd.ml.backends.ggml import one_thread  # noqa: E402


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("one") / "w.gguf"
    writer = GGUFWriter(str(path), "test")
    writer.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    b = open_backend("ggml", open_gguf(path), BackendOptions(num_thread=2))
    yield b
    b.close()


def product(backend, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    with backend.new_context() as ctx:
        return ctx.compute(ctx.input(x, DType.F32).linear(backend.weight("w")))[0]


def test_graphs_from_every_thread_run_on_the_one_compute_thread(
    backend, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    ran_on: list[threading.Thread] = []
    compute = L.ggml_backend_graph_compute

    def recorded(*args):  # type: ignore[no-untyped-def]
        ran_on.append(threading.current_thread())
        return compute(*args)

    monkeypatch.setattr(L, "ggml_backend_graph_compute", recorded)
    x = np.ones((2, 4), np.float32)
    want = x @ np.arange(12, dtype=np.float32).reshape(3, 4).T
    results = [product(backend, x)]  # this (the main) thread
    for _ in range(3):  # other threads, one after another
        t = threading.Thread(target=lambda: results.append(product(backend, x)))
        t.start()
        t.join()
    assert len(results) == 4 and all(np.array_equal(r, want) for r in results)
    assert len(ran_on) == 4
    assert set(ran_on) == {one_thread.compute_thread()}
    assert one_thread.compute_thread() is not threading.current_thread()


def test_an_error_reaches_the_caller_and_the_thread_goes_on() -> None:
    with pytest.raises(ZeroDivisionError):
        one_thread.run(lambda: 1 // 0)
    assert one_thread.run(lambda: 7) == 7
    # called from the compute thread itself (a job that computes): inline, no deadlock
    assert one_thread.run(lambda: one_thread.run(lambda: 8)) == 8
