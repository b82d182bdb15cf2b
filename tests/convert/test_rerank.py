"""Rerank with a cross-encoder: a tiny random BertForSequenceClassification (one label)
with a real WordPiece tokenizer, converted by herd, scored against sentence-transformers'
CrossEncoder, on every installed backend.

Scores are the raw logit (llama.cpp's `relevance_score`); CrossEncoder.predict's default
for a one-label model is its sigmoid, checked too. A pair longer than the context keeps
its query and cuts its document, which Hugging Face's tokenizer does with
`truncation="only_second"`: the reference for the rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
st = pytest.importorskip("sentence_transformers")

import herd  # noqa: E402
from herd.convert import convert  # noqa: E402
from herd.errors import (  # noqa: E402
    CapabilityError,
    ContextLengthError,
    HerdError,
    UnsupportedModelError,
)
from herd.gguf import open_gguf  # noqa: E402
from herd.ml import available_backends  # noqa: E402

from .rerank_case import CTX, DOCS, QUERY, build_cross_encoder  # noqa: E402
from .tiny import GOLDENS  # noqa: E402

BACKENDS = available_backends()
# as tests/parity: absolute, logits ~1
TOL = {"numpy": 1e-4, "ggml": 1e-3, "mlx": 1e-4, "onnx": 1e-4}


@pytest.fixture(scope="module")
def ranker(tmp_path_factory) -> tuple[Path, Path]:
    """(Hugging Face directory, herd's f32 GGUF)."""
    tmp = tmp_path_factory.mktemp("rerank")
    build_cross_encoder(tmp / "hf")
    return tmp / "hf", convert(tmp / "hf", tmp / "rerank.gguf", "f32")


@pytest.fixture(scope="module")
def cross_encoder(ranker) -> Any:
    return st.CrossEncoder(str(ranker[0]), device="cpu", max_length=CTX)


def test_head_is_written_under_llama_cpp_names(ranker) -> None:
    g = open_gguf(ranker[1])
    assert g.kv["bert.pooling_type"] == 4  # llama.cpp's LLAMA_POOLING_TYPE_RANK
    assert list(g.kv["bert.classifier.output_labels"]) == ["LABEL_0"]
    shapes = {n: tuple(t.shape) for n, t in g.tensors.items() if n.startswith("cls")}
    assert shapes == {
        "cls.weight": (64, 64),
        "cls.bias": (64,),
        "cls.output.weight": (1, 64),
        "cls.output.bias": (1,),
    }
    # the pooler and classifier weights travel unchanged (f32)
    from safetensors.numpy import load_file

    hf = load_file(str(ranker[0] / "model.safetensors"))
    for name, hf_name in [("cls.weight", "bert.pooler.dense.weight"),
                          ("cls.output.weight", "classifier.weight"),
                          ("cls.output.bias", "classifier.bias")]:  # fmt: skip
        got = g.raw(name).view(np.float32).reshape(shapes[name])
        np.testing.assert_array_equal(got, hf[hf_name])


def test_llama_cpp_scores_herds_file_as_herd_does(ranker) -> None:
    """llama.cpp (goldens from scripts/make_rerank_goldens.py) loads this very file as a
    reranker and reads its head as herd does. llama.cpp gives every token type 0, so herd
    is run so too here; its own rerank uses type 1 for the document, as Hugging Face."""
    import hashlib

    golden = json.loads((GOLDENS / "rerank.json").read_text())
    g = open_gguf(ranker[1])
    got = {n: hashlib.sha256(g.raw(n).tobytes()).hexdigest() for n in g.tensors}
    assert got == golden["tensors"]["f32"]
    llm = herd.load(ranker[1], backend="numpy")
    try:
        pairs = [(ids, [0] * len(ids)) for ids in golden["pairs"]]
        ours = llm.loaded.rerank(pairs)[:, 0]
        typed = [r["relevance_score"] for r in sorted(llm.rerank(QUERY, DOCS),
                                                     key=lambda r: r["index"])]  # fmt: skip
    finally:
        llm.close()
    # ggml's GELU is a float16 table: about 3e-4 off on these logits
    np.testing.assert_allclose(ours, golden["scores"], atol=1e-3)
    assert np.abs(np.asarray(typed) - ours).max() > 0.05  # the token types do matter


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_match_cross_encoder(ranker, cross_encoder, backend) -> None:
    import torch

    pairs = [(QUERY, d) for d in DOCS]
    logits = cross_encoder.predict(pairs, activation_fn=torch.nn.Identity(), batch_size=8)
    llm = herd.load(ranker[1], backend=backend)
    try:
        results = llm.rerank(QUERY, DOCS)
    finally:
        llm.close()
    scores = np.zeros(len(DOCS), np.float32)
    for r in results:
        scores[r["index"]] = r["relevance_score"]
    assert np.abs(logits).max() > 0.1  # the head is not degenerate: scores differ
    np.testing.assert_allclose(scores, logits, atol=TOL[backend], rtol=0)
    # sorted best first, every document once
    assert [r["index"] for r in results] == list(np.argsort(-logits, kind="stable"))
    # CrossEncoder's default score for one label is the logit's sigmoid
    default = cross_encoder.predict(pairs)
    np.testing.assert_allclose(1 / (1 + np.exp(-scores)), default, atol=TOL[backend])


def test_batched_equals_one_by_one(ranker) -> None:
    llm = herd.load(ranker[1], backend="numpy")
    try:
        both = {r["index"]: r["relevance_score"] for r in llm.rerank(QUERY, DOCS)}
        alone = [llm.rerank(QUERY, [d])[0]["relevance_score"] for d in DOCS]
    finally:
        llm.close()
    np.testing.assert_allclose([both[i] for i in range(len(DOCS))], alone, atol=1e-5)


def test_top_n_and_documents(ranker) -> None:
    llm = herd.load(ranker[1], backend="numpy")
    try:
        full = llm.rerank(QUERY, DOCS)
        top = llm.rerank(QUERY, DOCS, top_n=2, return_documents=True)
        with pytest.raises(HerdError, match="top_n"):
            llm.rerank(QUERY, DOCS, top_n=0)
        with pytest.raises(HerdError, match="documents"):
            llm.rerank(QUERY, [])
    finally:
        llm.close()
    assert [r["index"] for r in top] == [r["index"] for r in full[:2]]
    assert [r["document"] for r in top] == [{"text": DOCS[r["index"]]} for r in top]
    assert "document" not in full[0]


def test_long_document_is_cut_query_kept(ranker) -> None:
    """The stated rule against Hugging Face's `only_second` truncation at the context."""
    import torch
    import transformers

    long_doc = " ".join(["berlin is a large city with many people"] * 20)
    tok = transformers.AutoTokenizer.from_pretrained(str(ranker[0]))
    enc = tok(QUERY, long_doc, truncation="only_second", max_length=CTX, return_tensors="pt")
    assert enc["input_ids"].shape[1] == CTX and int(enc["token_type_ids"].sum()) > 0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(ranker[0]))
    with torch.no_grad():
        want = float(model.eval()(**enc).logits[0, 0])
    llm = herd.load(ranker[1], backend="numpy")
    try:
        (got,) = llm.rerank(QUERY, [long_doc])
        assert got["relevance_score"] == pytest.approx(want, abs=1e-4)
        with pytest.raises(ContextLengthError, match="query"):  # the query is never cut
            llm.rerank(long_doc, ["berlin"])
    finally:
        llm.close()


def test_embedding_model_refuses_rerank_and_ranker_refuses_embed(ranker, tmp_path) -> None:
    from .tiny import build

    src, _ = build("bert-mean", tmp_path / "hf")
    path = convert(src, tmp_path / "embed.gguf", "f32")
    g = open_gguf(path)  # a model without the head stays an embedding model
    assert g.kv["bert.pooling_type"] == 1 and not [n for n in g.tensors if n.startswith("cls")]
    embedder = herd.load(path, backend="numpy")
    try:
        with pytest.raises(CapabilityError, match="does not support rerank"):
            embedder.rerank(QUERY, DOCS)
        assert "rerank" not in embedder.info()["capabilities"]
    finally:
        embedder.close()
    llm = herd.load(ranker[1], backend="numpy")
    try:
        with pytest.raises(CapabilityError, match="does not support embeddings"):
            llm.embed(["berlin"])
        with pytest.raises(CapabilityError):
            llm.generate("berlin")
        assert llm.info()["capabilities"] == ["rerank"]
    finally:
        llm.close()


def test_more_than_one_label_is_refused(tmp_path) -> None:
    build_cross_encoder(tmp_path / "hf", num_labels=3)
    with pytest.raises(UnsupportedModelError, match="3 labels is not a reranker"):
        convert(tmp_path / "hf", tmp_path / "out.gguf", "f32")
    assert not (tmp_path / "out.gguf").exists()  # nothing half-written


def test_llama_cpp_layout_without_pooler(ranker, tmp_path) -> None:
    """llama.cpp's own converter drops the pooler and writes no pooling type (its server
    takes --reranking): herd reads such a file as a reranker scoring, as llama.cpp does,
    the classifier on the bare [CLS] state, which transformers computes here."""
    import torch
    import transformers

    from herd.gguf.writer import write_gguf
    from herd.store.facts import capabilities

    g = open_gguf(ranker[1])
    kv = {k: v for k, v in g.kv.items() if k != "bert.pooling_type"}
    arrays = [(n, g.raw(n).view(np.float32).reshape(t.shape), None)
              for n, t in g.tensors.items() if n not in ("cls.weight", "cls.bias")]  # fmt: skip
    path = write_gguf(tmp_path / "no-pooler.gguf", "bert", kv, arrays)
    assert capabilities("bert", open_gguf(path).kv, None) == ["rerank"]
    tok = transformers.AutoTokenizer.from_pretrained(str(ranker[0]))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(ranker[0]))
    enc = tok([QUERY] * len(DOCS), DOCS, padding=True, return_tensors="pt")
    with torch.no_grad():
        cls = model.eval().bert(**enc).last_hidden_state[:, 0]
        want = model.classifier(cls)[:, 0].numpy()
    llm = herd.load(path, backend="numpy")
    try:
        got = sorted(llm.rerank(QUERY, DOCS), key=lambda r: r["index"])
    finally:
        llm.close()
    np.testing.assert_allclose([r["relevance_score"] for r in got], want, atol=1e-4)
