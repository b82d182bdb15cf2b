"""Every registered architecture on every installed backend, with a tiny random model.

The models are the converter's tiny cases (tests/convert/tiny.py): a transformers model
per architecture with its quirks switched on, saved and converted by `herd convert`.
For each decoder and backend:
- logits match transformers (NumPy 1e-4 relative; graph backends within what their
  F16 kernels allow);
- cached decode, token by token, equals the full recomputation;
- a batch holding two sequences equals the two run alone.
A registered architecture without a tiny case fails the suite.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("sentencepiece")

from convert.tiny import CASES, build, hf_logits, input_ids  # noqa: E402
from parity.harness import Engine, rel_err  # noqa: E402

from herd.convert import convert  # noqa: E402
from herd.ml import available_backends  # noqa: E402
from herd.models import Batch, supported_architectures  # noqa: E402

ENCODERS = {"bert"}  # no cache, no decode: covered by tests/convert (embeddings)
TOL = {"numpy": 1e-4, "ggml": 1e-3}
# Gemma 3 on ggml measures ~3e-3: its 256-wide heads go through ggml's F16 matmul paths
GEMMA_GGML_TOL = 4e-3


def tol(path, backend: str) -> float:
    return GEMMA_GGML_TOL if backend == "ggml" and "gemma3" in str(path) else TOL[backend]
DECODER_CASES = [name for name, c in CASES.items() if c.arch not in ENCODERS]


def test_every_architecture_has_a_tiny_case():
    missing = set(supported_architectures()) - {c.arch for c in CASES.values()}
    assert not missing, f"add a tiny case to tests/convert/tiny.py for: {sorted(missing)}"


@pytest.fixture(scope="module", params=DECODER_CASES, ids=DECODER_CASES)
def case(request, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    src, model = build(name, tmp / "hf")
    ids = input_ids(name, model.config.vocab_size)[:24]
    return model, convert(src, tmp / "model.gguf", "f32"), ids


@pytest.fixture(params=available_backends())
def backend(request):
    return request.param


def test_logits_match_transformers(case, backend):
    model, path, ids = case
    ours = Engine(path, backend).forward(Batch.single(ids, outputs="all"))
    assert rel_err(ours, hf_logits(model, ids)) < tol(path, backend)


def test_cached_decode_equals_recompute(case, backend):
    _, path, ids = case
    full = Engine(path, backend).forward(Batch.single(ids, outputs="all"))
    engine = Engine(path, backend)
    half = len(ids) // 2
    rows = [engine.forward(Batch.single(ids[:half], 0))[0]]
    rows += [engine.forward(Batch.single([ids[i]], i))[0] for i in range(half, len(ids))]
    assert rel_err(np.stack(rows), full[half - 1 :]) < tol(path, backend)


def test_batch_of_two_equals_two_singles(case, backend):
    _, path, ids = case
    a, b = ids[:16], ids[5:][::-1][:11]
    alone = [Engine(path, backend).forward(Batch.single(s, outputs="all")) for s in (a, b)]
    both = Batch(
        np.array(a + b, np.int32),
        np.array(list(range(len(a))) + list(range(len(b))), np.int32),
        np.array([0] * len(a) + [1] * len(b), np.int32),
        np.arange(len(a) + len(b), dtype=np.int32),
    )
    out = Engine(path, backend).forward(both)
    assert rel_err(out[: len(a)], alone[0]) < tol(path, backend)
    assert rel_err(out[len(a) :], alone[1]) < tol(path, backend)
