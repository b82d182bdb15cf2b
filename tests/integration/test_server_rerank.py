"""`POST /api/rerank` and `POST /v1/rerank` against `herd serve`, with a plain HTTP client:
a tiny random cross-encoder (tests/convert/test_rerank.py's) created in the server's store,
its ordering and scores against sentence-transformers' CrossEncoder, `top_n`,
`return_documents`, Jina's document objects, `/api/show` capabilities, and the 400s (bad
fields, a model without a classifier head) after which the server keeps serving."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")
from convert.rerank_case import CTX, DOCS, QUERY, build_cross_encoder  # noqa: E402

from herd.convert import convert  # noqa: E402
from integration.test_server import Server, _start  # noqa: E402

pytestmark = pytest.mark.slow

RANKER = "ranker:tiny"
EMBED = "all-minilm:l6-v2"  # the built-in embedding model, in the test store
ROUTES = ["/api/rerank", "/v1/rerank"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("ranker") / "hf"
    build_cross_encoder(dest)
    return dest


@pytest.fixture(scope="module")
def server(tmp_path_factory, test_store, hf_dir) -> Iterator[Server]:
    from herd.modelfile import parse
    from herd.store import Store, resolve_or_pull
    from herd.store.create import create

    resolve_or_pull(EMBED, store=test_store)
    gguf = convert(hf_dir, hf_dir.parent / "ranker.gguf", "f32")
    for s in _start(tmp_path_factory.mktemp("rerank"), test_store, {}):
        create(Store(s.store), RANKER, parse(f"FROM {gguf}"), base_dir=gguf.parent)
        yield s


@pytest.fixture(scope="module")
def reference(hf_dir) -> np.ndarray:
    import torch

    ce = st.CrossEncoder(str(hf_dir), device="cpu", max_length=CTX)
    return ce.predict([(QUERY, d) for d in DOCS], activation_fn=torch.nn.Identity())


def post(server: Server, route: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, timeout=120)


@pytest.mark.parametrize("route", ROUTES)
def test_ordering_and_scores(server: Server, reference: np.ndarray, route: str) -> None:
    r = post(server, route, {"model": RANKER, "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == RANKER
    results = body["results"]
    assert [x["index"] for x in results] == list(np.argsort(-reference, kind="stable"))
    got = {x["index"]: x["relevance_score"] for x in results}
    np.testing.assert_allclose([got[i] for i in range(len(DOCS))], reference, atol=1e-4)
    assert all(set(x) == {"index", "relevance_score"} for x in results)
    usage = body["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > len(DOCS) * 4


@pytest.mark.parametrize("route", ROUTES)
def test_top_n_and_return_documents(server: Server, reference: np.ndarray, route: str) -> None:
    best = list(np.argsort(-reference, kind="stable"))
    objects = [{"text": d} for d in DOCS]  # Jina's document objects
    r = post(
        server,
        route,
        {"model": RANKER, "query": QUERY, "documents": objects, "top_n": 2,
         "return_documents": True},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == best[:2]
    assert [x["document"] for x in results] == [{"text": DOCS[i]} for i in best[:2]]
    many = post(server, route, {"model": RANKER, "query": QUERY, "documents": DOCS, "top_n": 99})
    assert [x["index"] for x in many.json()["results"]] == best  # clamped, as llama.cpp does


def test_show_lists_rerank(server: Server) -> None:
    caps = httpx.post(f"{server.url}/api/show", json={"model": RANKER}).json()["capabilities"]
    assert caps == ["rerank"]
    embed = httpx.post(f"{server.url}/api/show", json={"model": EMBED}).json()["capabilities"]
    assert "rerank" not in embed


BAD = [
    ({"query": QUERY, "documents": []}, "documents"),
    ({"query": QUERY}, "documents"),
    ({"query": QUERY, "documents": "one"}, "documents"),
    ({"query": QUERY, "documents": ["a", 3]}, "documents\\[1\\]"),
    ({"query": QUERY, "documents": [{"text": 3}]}, "documents\\[0\\].text"),
    ({"query": QUERY, "documents": DOCS, "top_n": 0}, "top_n"),
    ({"query": QUERY, "documents": DOCS, "top_n": "2"}, "top_n"),
    ({"query": QUERY, "documents": DOCS, "top_n": True}, "top_n"),
    ({"query": QUERY, "documents": DOCS, "return_documents": "yes"}, "return_documents"),
    ({"documents": DOCS}, "query"),
    ({"query": 5, "documents": DOCS}, "query"),
    ({"query": " ".join(["berlin"] * 80), "documents": DOCS}, "query"),  # past the context
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("fields", "match"), BAD)
def test_bad_input_is_400(server: Server, route: str, fields: dict, match: str) -> None:
    r = post(server, route, {"model": RANKER, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error["message"] if route.startswith("/v1/") else error
    assert isinstance(message, str)
    assert re.search(match, message), message


@pytest.mark.parametrize("route", ROUTES)
def test_embedding_model_is_refused_and_server_keeps_serving(server: Server, route: str) -> None:
    r = post(server, route, {"model": EMBED, "query": QUERY, "documents": DOCS})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error["message"] if route.startswith("/v1/") else error
    assert message == f'"{EMBED}" does not support rerank'
    missing = post(server, route, {"model": "nope:1", "query": QUERY, "documents": DOCS})
    assert missing.status_code == 404
    embed = httpx.post(f"{server.url}/api/embed", json={"model": EMBED, "input": "berlin"})
    assert embed.status_code == 200 and len(embed.json()["embeddings"][0]) == 384
    # a rerank model computes no embeddings: 400 from its runner, which keeps serving
    no = httpx.post(f"{server.url}/api/embed", json={"model": RANKER, "input": "berlin"})
    assert no.status_code == 400 and "does not support embeddings" in no.text
    ok = post(server, route, {"model": RANKER, "query": QUERY, "documents": DOCS[:2]})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2
