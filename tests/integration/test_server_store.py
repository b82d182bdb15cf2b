"""`/api/create`, `/api/blobs/:digest`, `/api/push` and `/api/pull` of a real `herd serve`,
driven by the official `ollama` client the way `ollama create` and `ollama push` use them:
upload each file (HEAD, then POST when missing), create from the digests, push to a real
registry (Debian's docker-registry, from test_registry), pull back, run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest

from integration.test_registry import registry  # noqa: F401 - the docker-registry fixture
from integration.test_server import FAST, MODEL, Server, _start

ollama = pytest.importorskip("ollama")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, test_store: object
) -> Iterator[Server]:
    yield from _start(tmp_path_factory.mktemp("server-store"), test_store, {})


def _tiny_gguf(path: Path) -> Path:
    """A small valid llama GGUF (enough to create and show, not to run)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_file_type(0)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _show(server: Server, name: str) -> dict:
    r = httpx.post(f"{server.url}/api/show", json={"model": name})
    assert r.status_code == 200, r.text
    return r.json()


def _manifest(server: Server, name: str) -> dict:
    from herd.store import Store

    return json.loads(Store(server.store).read_manifest(name)[1])


# ---------------------------------------------------------------- create
def test_create_from_an_uploaded_gguf(server: Server, tmp_path: Path) -> None:
    client = server.ollama()
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    digest = _digest(path)
    url = f"{server.url}/api/blobs/{digest}"
    assert httpx.head(url).status_code == 404
    assert client.create_blob(path) == digest  # HEAD 404, then POST 201
    assert httpx.head(url).status_code == 200
    assert httpx.post(url, content=path.read_bytes()).status_code == 200  # exists already
    steps = [
        p.status
        for p in client.create(
            "tiny-up:1",
            files={"tiny.gguf": digest},
            template="{{ .Prompt }}",
            system="You are terse.",
            license=["MIT", "Apache-2.0"],
            parameters={"temperature": 0.5, "stop": ["<end>", "<eot>"], "num_ctx": 128},
            messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
            stream=True,
        )
    ]
    assert steps[0] == "gathering model components" and steps[-1] == "success"
    assert "writing manifest" in steps
    shown = _show(server, "tiny-up:1")
    assert shown["template"] == "{{ .Prompt }}" and shown["system"] == "You are terse."
    assert shown["license"] == "MIT\nApache-2.0" and shown["details"]["family"] == "llama"
    assert [m["content"] for m in shown["messages"]] == ["Hi", "Yo"]
    params = [line.split(None, 1) for line in shown["parameters"].splitlines()]
    assert ["temperature", "0.5"] in params and ["stop", '"<eot>"'] in params
    # the uploaded blob is the model layer itself (used in place, not copied)
    layers = _manifest(server, "tiny-up:1")["layers"]
    assert layers[0]["digest"] == digest and layers[0]["from"] == "tiny.gguf"
    assert not [p for p in server.store.iterdir() if p.name.startswith(".herd-")]  # staging
    client.delete("tiny-up:1")


def test_create_from_a_model_and_run_it(server: Server) -> None:
    client = server.ollama()
    done = client.create(
        "terse:1",
        from_=MODEL,
        system="Answer in one short sentence.",
        parameters={"num_predict": 5, "temperature": 0},
    )
    assert done.status == "success"
    layers = _manifest(server, "terse:1")["layers"]
    base = _manifest(server, MODEL)["layers"]
    assert layers[0]["digest"] == base[0]["digest"] and layers[0]["from"] == MODEL
    answer = client.chat("terse:1", [{"role": "user", "content": "Why is the sky blue?"}])
    assert answer.done and answer.eval_count == 5  # the created num_predict applies
    assert _show(server, "terse:1")["system"] == "Answer in one short sentence."
    client.delete("terse:1")


def test_create_from_a_hugging_face_folder(server: Server, tmp_path: Path) -> None:
    from convert.handmade import make_dir

    client = server.ollama()
    folder = make_dir(tmp_path)  # a tiny BERT, written by hand
    files = {p.name: client.create_blob(p) for p in sorted(folder.iterdir())}
    steps = [p.status for p in client.create("tiny-bert:1", files=files, stream=True)]
    assert "converting model" in steps and steps[-1] == "success"
    shown = client.show("tiny-bert:1")
    assert shown.details.family == "bert"
    vector = client.embed("tiny-bert:1", "hello world").embeddings[0]
    assert len(vector) == 8 and abs(float(np.linalg.norm(vector)) - 1) < 1e-4
    # The OpenAI SDK asks for base64 by default and decodes it to floats itself
    sdk = server.openai().embeddings
    by_default = sdk.create(model="tiny-bert:1", input="hello world").data[0].embedding
    as_floats = sdk.create(model="tiny-bert:1", input="hello world", encoding_format="float")
    np.testing.assert_allclose(by_default, vector, atol=1e-6)
    np.testing.assert_allclose(as_floats.data[0].embedding, vector, atol=1e-6)
    client.delete("tiny-bert:1")


@pytest.mark.parametrize(
    "body,fragment",
    [
        ({"from": MODEL, "template": "{{ .Prompt"}, "template"),
        ({"from": MODEL, "parameters": {"nope": 1}}, "unknown parameter 'nope'"),
        ({"from": MODEL, "parameters": {"num_ctx": "big"}}, "num_ctx"),
        ({"from": MODEL, "quantize": "q3_weird"}, "quantization type"),
        ({}, "neither 'from' or 'files' was specified"),
        ({"files": {"../x.gguf": "sha256:" + "a" * 64}}, "file path must be relative"),
        ({"files": {"x.gguf": "sha256:123"}}, "invalid digest format"),
        ({"files": {"x.gguf": "sha256:" + "b" * 64}}, "not found"),
        ({"from": "/etc/passwd"}, "invalid model name"),
    ],
    ids=[
        "template",
        "param-name",
        "param-type",
        "quantize",
        "no-source",
        "path",
        "digest",
        "missing-blob",
        "server-path",
    ],
)
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_create_bad_requests_are_400(
    server: Server, body: dict, fragment: str, stream: bool
) -> None:
    r = httpx.post(
        f"{server.url}/api/create", json={"model": "bad:1", "stream": stream, **body}, timeout=30
    )
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]
    assert "bad:1" not in [m.model for m in server.ollama().list().models]


def test_create_rejects_a_file_that_is_not_gguf(server: Server, tmp_path: Path) -> None:
    client = server.ollama()
    path = tmp_path / "notes.txt"
    path.write_text("just text")
    digest = client.create_blob(path)
    with pytest.raises(ollama.ResponseError) as e:
        client.create("bad:1", files={"notes.txt": digest})
    assert (e.value.status_code, e.value.error) == (400, "supplied file was not in GGUF format")


def test_blob_upload_checks_the_digest(server: Server) -> None:
    data = b"some bytes"
    wrong = "sha256:" + hashlib.sha256(b"other bytes").hexdigest()
    r = httpx.post(f"{server.url}/api/blobs/{wrong}", content=data)
    assert r.status_code == 400 and "digest mismatch" in r.json()["error"]
    assert httpx.head(f"{server.url}/api/blobs/{wrong}").status_code == 404
    assert httpx.post(f"{server.url}/api/blobs/sha256:xyz", content=data).status_code == 400
    leftovers = [p for p in (server.store / "blobs").iterdir() if not p.name.startswith("sha256")]
    assert leftovers == []


# ---------------------------------------------------------------- push and pull
def test_push_pull_round_trip(server: Server, registry: str) -> None:  # noqa: F811
    client = server.ollama()
    name = f"{registry}/herd/smol:1"
    client.create(name, from_=MODEL, system="You are a test.", parameters={"num_predict": 3})
    before = _manifest(server, name)
    steps = [p.status for p in client.push(name, insecure=True, stream=True)]
    assert steps[0] == "retrieving manifest" and steps[-1] == "success"
    assert any(s.startswith("pushing ") for s in steps) and "pushing manifest" in steps
    assert client.push(name, insecure=True).status == "success"  # again: blobs exist
    client.delete(name)
    assert name not in [m.model for m in client.list().models]
    steps = [p.status for p in client.pull(name, insecure=True, stream=True)]
    assert steps[-1] == "success"
    assert _manifest(server, name) == before
    answer = client.generate(name, "Hi", options=FAST)
    assert answer.done and answer.response
    client.delete(name)
    with pytest.raises(ollama.ResponseError) as e:
        client.push("not-here:1", insecure=True)
    assert e.value.status_code == 404
