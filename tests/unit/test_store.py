"""The store writes and reads Ollama's layout; writes are atomic."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from _store_helpers import write_gguf

from herd.errors import DownloadError, ModelNotFoundError
from herd.store import Store
from herd.store.layout import (
    CONFIG_V1,
    MANIFEST_V2,
    MEDIA_LICENSE,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_PROMPT,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    TEMP_PREFIX,
    BlobWriter,
    DigestError,
    Layer,
    Manifest,
    atomic_file,
    parse_digest,
)


def add_model(store: Store, tmp: Path, name: str, **kw: object) -> Layer:
    """Put a tiny GGUF into the store as `name`; returns its model layer."""
    src = write_gguf(tmp / f"{abs(hash(name))}.gguf")
    with store.blob_writer() as w:
        w.write(src.read_bytes())
        layer = w.commit()
    store.write_model(name, layer, **kw)  # type: ignore[arg-type]
    return layer


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "models")


def test_write_and_resolve(store: Store, tmp_path: Path) -> None:
    layer = add_model(
        store,
        tmp_path,
        "tiny:1",
        template="T {{ .Prompt }}",
        system="be brief",
        params={"stop": ["<s>"], "temperature": 0.5},
        license=["MIT", "Other"],
    )
    ref = store.resolve("tiny:1")
    assert ref.name == "tiny:1"
    assert ref.model_path == store.root / "blobs" / ("sha256-" + layer.digest[7:])
    assert ref.model_path.read_bytes()[:4] == b"GGUF"
    assert (ref.template, ref.system) == ("T {{ .Prompt }}", "be brief")
    assert ref.params == {"stop": ["<s>"], "temperature": 0.5}
    assert ref.license == ["MIT", "Other"]
    manifest_file = store.root / "manifests/registry.ollama.ai/library/tiny/1"
    assert ref.digest == hashlib.sha256(manifest_file.read_bytes()).hexdigest()
    assert ref.config["model_family"] == "llama"


def test_manifest_bytes_match_ollama_format(store: Store, tmp_path: Path) -> None:
    add_model(
        store, tmp_path, "tiny:1", template="t", system="s", params={"stop": ["<x>"]}, license=["L"]
    )
    data = (store.root / "manifests/registry.ollama.ai/library/tiny/1").read_bytes()
    # Go's json.Encoder: compact, trailing newline, struct field order
    assert data.endswith(b"}\n") and b": " not in data and b", " not in data
    m = json.loads(data)
    assert list(m) == ["schemaVersion", "mediaType", "config", "layers"]
    assert m["schemaVersion"] == 2
    assert m["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert m["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert [x["mediaType"] for x in m["layers"]] == [
        MEDIA_MODEL,
        MEDIA_TEMPLATE,
        MEDIA_SYSTEM,
        MEDIA_PARAMS,
        MEDIA_LICENSE,
    ]
    for layer in [m["config"], *m["layers"]]:
        assert list(layer) == ["mediaType", "digest", "size"]
        blob = store.blob_path(layer["digest"]).read_bytes()
        assert (len(blob), "sha256:" + hashlib.sha256(blob).hexdigest()) == (
            layer["size"],
            layer["digest"],
        )
    config = json.loads(store.blob_path(m["config"]["digest"]).read_bytes())
    assert config == {
        "model_format": "gguf",
        "model_family": "llama",
        "model_families": ["llama"],
        "model_type": "136",
        "file_type": "Q4_1",
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [x["digest"] for x in m["layers"]]},
    }
    # Go escapes <, > and & in JSON strings; equal bytes keep blob digests equal to Ollama's
    params = store.blob_path(m["layers"][3]["digest"]).read_bytes()
    assert params == b'{"stop":["\\u003cx\\u003e"]}\n'


def test_reads_a_store_written_by_ollama(store: Store) -> None:
    """Legacy `.prompt` template layer, foreign host, layer `from` field."""
    blobs = store.root / "blobs"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / f"sha256-{digest}").write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_V2,
        "config": {"mediaType": CONFIG_V1, **blob(b'{"model_format":"gguf"}')},
        "layers": [
            {"mediaType": MEDIA_MODEL, **blob(b"GGUF..."), "from": "/x"},
            {"mediaType": MEDIA_PROMPT, **blob(b"{{ .Prompt }}")},
        ],
    }
    path = store.root / "manifests/example.com/me/m/v1"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(manifest, indent=2))
    ref = store.resolve("example.com/me/m:v1")
    assert ref.template == "{{ .Prompt }}"
    assert ref.name == "example.com/me/m:v1"
    assert [e.name for e in store.list()] == ["example.com/me/m:v1"]


def test_list(store: Store, tmp_path: Path) -> None:
    assert store.list() == []
    add_model(store, tmp_path, "old:1")
    old = store.root / "manifests/registry.ollama.ai/library/old/1"
    os.utime(old, (time.time() - 600, time.time() - 600))
    add_model(store, tmp_path, "me/new:2", system="s")
    entries = store.list()
    assert [e.name for e in entries] == ["me/new:2", "old:1"]  # newest first
    new = store.root / "manifests/registry.ollama.ai/me/new/2"
    data = new.read_bytes()
    manifest = Manifest.from_bytes(data)
    assert entries[0].digest == hashlib.sha256(data).hexdigest()
    assert entries[0].size == sum(x.size for x in manifest.layers) + manifest.config.size
    assert entries[0].modified.timestamp() == pytest.approx(new.stat().st_mtime)
    assert entries[0].details["file_type"] == "Q4_1"


@pytest.mark.parametrize("call", ["resolve", "delete"], ids=["resolve", "delete"])
def test_missing_model(store: Store, call: str) -> None:
    with pytest.raises(ModelNotFoundError, match="^model 'nope' not found$"):
        getattr(store, call)("nope")


def test_copy_missing_source(store: Store) -> None:
    with pytest.raises(ModelNotFoundError, match="^model 'nope' not found$"):
        store.copy("nope", "other")


def test_lookup_is_case_insensitive(store: Store, tmp_path: Path) -> None:
    add_model(store, tmp_path, "SmolLM2:135M")
    assert store.resolve("smollm2:135m").name == "SmolLM2:135M"
    store.copy("smollm2:135M", "mine")
    store.copy("SMOLLM2:135m", "MINE")  # lands on the existing "mine", no second manifest
    assert sorted(e.name for e in store.list()) == ["SmolLM2:135M", "mine:latest"]


def test_copy_shares_blobs_and_digest(store: Store, tmp_path: Path) -> None:
    add_model(store, tmp_path, "a:1", system="s")
    blobs_before = files_under(store.blobs_dir)
    store.copy("a:1", "ns/b:2")
    assert store.resolve("ns/b:2").digest == store.resolve("a:1").digest
    assert files_under(store.blobs_dir) == blobs_before


def test_delete_removes_only_unreferenced_blobs(store: Store, tmp_path: Path) -> None:
    add_model(store, tmp_path, "a:1", system="shared")
    store.copy("a:1", "b:1")
    add_model(store, tmp_path, "ns/c:1", system="own")
    blobs_with_c = set(files_under(store.blobs_dir))
    store.delete("ns/c:1")
    gone = blobs_with_c - set(files_under(store.blobs_dir))
    own = "sha256-" + hashlib.sha256(b"own").hexdigest()
    assert own in gone
    assert not (store.manifests_dir / "registry.ollama.ai/ns").exists()  # empty dirs pruned
    store.delete("a:1")
    assert store.resolve("b:1").model_path.is_file()  # still referenced by b
    store.delete("b:1")
    assert files_under(store.root) == []


@pytest.mark.parametrize(
    "digest,hex_",
    [
        ("sha256:" + "a" * 64, "a" * 64),
        ("sha256-" + "A" * 64, "a" * 64),
    ],
    ids=["colon", "dash-upper"],
)
def test_parse_digest_valid(digest: str, hex_: str) -> None:
    assert parse_digest(digest) == hex_


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:" + "a" * 63,
        "sha256:" + "g" * 64,
        "sha512:" + "a" * 64,
        "a" * 64,
        "sha256:../../" + "a" * 58,
        "sha256:" + "a" * 64 + "\n",
    ],
    ids=["short", "not-hex", "sha512", "no-prefix", "traversal", "newline"],
)
def test_parse_digest_invalid(store: Store, digest: str) -> None:
    with pytest.raises(DigestError):
        parse_digest(digest)
    with pytest.raises(DigestError):
        store.blob_path(digest)


def test_blob_writer_rejects_wrong_digest_and_leaves_nothing(store: Store) -> None:
    with pytest.raises(DownloadError, match="digest mismatch"):
        with store.blob_writer("sha256:" + "0" * 64) as w:
            w.write(b"hello")
            w.commit()
    assert files_under(store.root) == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt], ids=["error", "ctrl-c"])
def test_failing_blob_writer_leaves_nothing(store: Store, exc: type[BaseException]) -> None:
    with pytest.raises(exc):
        with store.blob_writer() as w:
            w.write(b"partial")
            raise exc()
    assert files_under(store.root) == []


def test_blob_writer_commits_under_its_digest(tmp_path: Path) -> None:
    digest = "sha256:" + hashlib.sha256(b"hello").hexdigest()
    with BlobWriter(tmp_path, digest) as w:
        w.write(b"hel")
        w.write(b"lo")
        layer = w.commit()
    assert (layer.digest, layer.size) == (digest, 5)
    assert files_under(tmp_path) == ["sha256-" + digest[7:]]


def test_atomic_file_keeps_old_content_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "manifest"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as f:
            f.write(b"new, half written")
            raise RuntimeError
    assert target.read_bytes() == b"old"
    assert files_under(tmp_path) == ["manifest"]


def test_model_with_missing_blob_is_reported(store: Store, tmp_path: Path) -> None:
    layer = add_model(store, tmp_path, "a:1")
    store.blob_path(layer.digest).unlink()
    with pytest.raises(Exception, match="incomplete"):
        store.resolve("a:1")


def test_remove_stale_temp(store: Store) -> None:
    store.blobs_dir.mkdir(parents=True)
    old, fresh = store.blobs_dir / (TEMP_PREFIX + "old"), store.blobs_dir / (TEMP_PREFIX + "new")
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    store.remove_stale_temp()
    assert files_under(store.blobs_dir) == [fresh.name]
