"""benchmarks/requantize.py: a GGUF whose 2-D weights all take one block type (the format
onnxruntime-genai's builder makes), for the ONNX comparison on equal weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize

from benchmarks.requantize import requantize


def test_two_d_weights_take_the_type_and_the_rest_is_copied(tiny_llama_path: Path,
                                                            tmp_path: Path) -> None:  # fmt: skip
    dst = requantize(tiny_llama_path, tmp_path / "q4_0.gguf")
    src, out = GGUFReader(tiny_llama_path), GGUFReader(dst)
    assert [t.name for t in out.tensors] == [t.name for t in src.tensors]
    for a, b in zip(src.tensors, out.tensors, strict=True):
        if len(a.shape) == 2:
            assert b.tensor_type == Q.Q4_0, a.name
            shape = tuple(int(d) for d in reversed(a.shape))
            want = np.asarray(dequantize(a.data, a.tensor_type), np.float32).reshape(shape)
            got = np.asarray(dequantize(b.data, Q.Q4_0), np.float32).reshape(shape)
            # Q4_0: 16 levels over each block's largest magnitude, so within one step of it
            step = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True) / 8
            assert np.all(np.abs(got - want).reshape(-1, 32) <= step + 1e-6), a.name
        else:
            assert b.tensor_type == a.tensor_type and np.array_equal(a.data, b.data), a.name
    kept = [k for k in src.fields if not k.startswith("GGUF.") and k != "general.file_type"]
    for key in kept:
        assert out.fields[key].contents() == src.fields[key].contents(), key
    assert out.fields["general.file_type"].contents() == 2  # MOSTLY_Q4_0
    assert not list(tmp_path.glob(".*.tmp"))  # written aside, renamed into place


def test_the_requantized_model_runs_close_to_the_source(tiny_llama_path: Path,
                                                       tmp_path: Path) -> None:  # fmt: skip
    from parity.harness import Engine, rel_err

    from herd.models import Batch

    dst = requantize(tiny_llama_path, tmp_path / "q4_0.gguf")
    tokens = [1, 5, 9, 13, 2, 7]
    want = Engine(tiny_llama_path, "numpy").forward(Batch.single(tokens))
    got = Engine(dst, "numpy").forward(Batch.single(tokens))
    assert got.shape == want.shape and 0 < rel_err(got, want) < 0.2


def test_an_unknown_type_is_refused(tiny_llama_path: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        requantize(tiny_llama_path, tmp_path / "x.gguf", "q3_nope")
    assert not list(tmp_path.iterdir())


def test_a_failed_write_leaves_nothing(tiny_llama_path: Path, tmp_path: Path, monkeypatch) -> None:
    import benchmarks.requantize as rq

    def broken(array, qtype):
        raise ValueError("no room")

    monkeypatch.setattr(rq, "quantize", broken)
    with pytest.raises(ValueError, match="no room"):
        requantize(tiny_llama_path, tmp_path / "q4_0.gguf")
    assert not list(tmp_path.iterdir())
