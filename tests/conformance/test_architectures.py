"""Every registered architecture on every installed backend, with a tiny random model.

The models are the converter's tiny cases (tests/convert/tiny.py): a transformers model
per architecture with its quirks switched on, saved and converted by `herd convert`.
For each decoder and backend:
- logits match transformers to 1e-4 relative (ggml with its exact GELU: its default
  kernel reads an F16 table, as llama.cpp does, checked on its own below);
- cached decode, token by token, equals the full recomputation;
- a batch holding two sequences equals the two run alone.
A registered architecture without a tiny case fails the suite.
"""

from __future__ import annotations

from pathlib import Path

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
TOL = 1e-4
# ggml's GELU kernel: an F16 lookup table (llama.cpp's, so herd's default), ~1.3e-3 on gemma3
TABLE_GELU_TOL = 3e-3
EXTRA = {"ggml": {"exact_gelu": True}}


def engine(path, backend: str) -> Engine:
    return Engine(path, backend, extra=EXTRA.get(backend))


DECODER_CASES = [name for name, c in CASES.items() if c.arch not in ENCODERS]


# Architectures whose checks need more than text, each in a suite of its own that makes the
# same three checks on every backend (logits against transformers, cached decode against
# recompute, a batch against singles): mllama's cross-attention needs an image to do
# anything, and llama.cpp, which makes the tiny cases' goldens, no longer runs mllama.
OWN_SUITES = {"mllama": Path(__file__).parents[1] / "convert" / "test_mllama.py"}


def test_every_architecture_has_a_tiny_case():
    covered = {c.arch for c in CASES.values()} | set(OWN_SUITES)
    missing = set(supported_architectures()) - covered
    assert not missing, f"add a tiny case to tests/convert/tiny.py for: {sorted(missing)}"
    assert all(path.is_file() for path in OWN_SUITES.values())


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
    ours = engine(path, backend).forward(Batch.single(ids, outputs="all"))
    assert rel_err(ours, hf_logits(model, ids)) < TOL


@pytest.mark.skipif("ggml" not in available_backends(), reason="ggml-python not installed")
def test_ggml_default_gelu_within_its_table_error(case):
    """The default path, with ggml's table GELU (what the real-model goldens check)."""
    model, path, ids = case
    ours = Engine(path, "ggml").forward(Batch.single(ids, outputs="all"))
    assert rel_err(ours, hf_logits(model, ids)) < TABLE_GELU_TOL


def test_cached_decode_equals_recompute(case, backend):
    _, path, ids = case
    full = engine(path, backend).forward(Batch.single(ids, outputs="all"))
    step = engine(path, backend)
    half = len(ids) // 2
    rows = [step.forward(Batch.single(ids[:half], 0))[0]]
    rows += [step.forward(Batch.single([ids[i]], i))[0] for i in range(half, len(ids))]
    assert rel_err(np.stack(rows), full[half - 1 :]) < TOL


def test_batch_of_two_equals_two_singles(case, backend):
    _, path, ids = case
    a, b = ids[:16], ids[5:][::-1][:11]
    alone = [engine(path, backend).forward(Batch.single(s, outputs="all")) for s in (a, b)]
    both = Batch(
        np.array(a + b, np.int32),
        np.array(list(range(len(a))) + list(range(len(b))), np.int32),
        np.array([0] * len(a) + [1] * len(b), np.int32),
        np.arange(len(a) + len(b), dtype=np.int32),
    )
    out = engine(path, backend).forward(both)
    assert rel_err(out[: len(a)], alone[0]) < TOL
    assert rel_err(out[len(a) :], alone[1]) < TOL
