"""Pulls against a registry that misbehaves, served in-process on 127.0.0.1.

`FakeRegistry` serves one model (`me/m:1`: a config blob and a model blob) and, by
`mode`, misbehaves on the model blob the way the hardening issue's fuzz run found: 416 on
ranges, bodies cut short, wrong bytes, redirects to itself, a slow drip, sizes of 2^63, 5xx.
Each test asserts the clear error, how many requests the server saw (bounded, no loop),
and that the store holds no blob and no manifest of the failed pull.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from herd.errors import DownloadError, HerdError, RegistryError
from herd.registry import Options, pull
from herd.registry.parts import MAX_PARTS, Part, plan_parts, read_parts, write_part
from herd.store import Store

# small numbers so that every bounded wait and retry takes milliseconds
FAST = dict(insecure=True, backoff=0.01, max_retries=3, timeout=2.0, part_min=1 << 20)
BLOB = bytes(range(256)) * 256  # 64 KiB model blob
NAME = "me/m:1"
_lock = threading.Lock()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeRegistry:
    blob: bytes = BLOB
    mode: str = ""
    manifest_size: int | None = None  # the model layer's size in the manifest (default: true)
    head_size: int | None = None  # the HEAD's Content-Length for the model blob
    cut_at: int = 10_000  # "truncate": bytes sent before the connection closes
    log: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, Range
    port: int = 0
    dripping: int = 0  # "drip" answers still being sent

    config: bytes = b'{"model_format":"gguf"}'

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return f"{self.host}/{NAME}"

    @property
    def model(self) -> str:
        return _digest(self.blob)

    def manifest(self) -> bytes:
        size = len(self.blob) if self.manifest_size is None else self.manifest_size
        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {
                    "mediaType": "application/vnd.docker.container.image.v1+json",
                    "digest": _digest(self.config),
                    "size": len(self.config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.ollama.image.model",
                        "digest": self.model,
                        "size": size,
                    }
                ],
            }
        ).encode()

    def model_requests(self, method: str = "GET") -> list[str]:
        """The Range headers of requests for the model blob (the 0-0 probe included)."""
        return [r for m, path, r in self.log if m == method and self.model in path]


def _handler(fake: FakeRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _head(self, status: int, headers: dict[str, str]) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()

        def _reply(self, status: int, body: bytes, **headers: str) -> None:
            self._head(status, {"Content-Length": str(len(body)), **headers})
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            rng = self.headers.get("Range", "")
            fake.log.append((self.command, path, rng))
            if path.endswith("/manifests/1"):
                if fake.mode == "500-manifest":
                    self._reply(500, b"try later")
                else:
                    self._reply(200, fake.manifest())
                return
            for data in (fake.config, fake.blob):
                if path.endswith(_digest(data)):
                    break
            else:
                self._reply(404, b"")
                return
            if data is fake.config or not self._misbehave(path, rng):
                self._serve(data, rng)

        def _serve(self, data: bytes, rng: str, *, extra: int = 0, cut: int | None = None) -> None:
            size = len(data)
            if self.command == "HEAD":
                length = fake.head_size if data is fake.blob and fake.head_size else size
                self._head(200, {"Content-Length": str(length)})
                return
            if not rng:
                self._reply(200, data)
                return
            start, _, stop = rng.removeprefix("bytes=").partition("-")
            a, b = int(start), min(int(stop), size - 1)
            body = data[a : b + 1]
            self._head(
                206,
                {
                    "Content-Length": str(len(body) + extra),
                    "Content-Range": f"bytes {a}-{b}/{size}",
                },
            )
            self.wfile.write(body[:cut])

        def _misbehave(self, path: str, rng: str) -> bool:
            """Answer the model blob's request the broken way; False: serve it normally."""
            mode, probe = fake.mode, rng == "bytes=0-0"
            if self.command == "HEAD":
                return False
            if mode == "416" or (mode == "416-resume" and not rng.startswith("bytes=0-")):
                self._reply(416, b"", **{"Content-Range": f"bytes */{len(fake.blob)}"})
            elif mode == "self-redirect":
                self._reply(307, b"", Location=path)
            elif mode == "redirect-chain":  # always somewhere new, never the same twice
                self._reply(307, b"", Location=f"{path}?hop={len(fake.log)}")
            elif mode == "500":
                self._reply(500, b"internal error")
            elif probe:
                return False
            elif mode == "truncate":  # the range it was asked for, cut after `cut_at` bytes
                self._serve(fake.blob, rng, cut=fake.cut_at)
                self.close_connection = True
            elif mode == "wrong-digest":
                bad = bytearray(fake.blob)
                bad[-1] ^= 0xFF
                self._serve(bytes(bad), rng)
            elif mode == "long-part":
                self._serve(fake.blob, rng, extra=1000)
            elif mode == "drip":  # one byte every 20 ms, for as long as the client listens
                start, _, stop = rng.removeprefix("bytes=").partition("-")
                body = fake.blob[int(start) : int(stop) + 1]
                self._head(206, {"Content-Length": str(len(body))})
                with _lock:
                    fake.dripping += 1
                with contextlib.suppress(OSError):
                    for i in range(len(body)):
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(0.02)
                with _lock:
                    fake.dripping -= 1
                self.close_connection = True
            else:
                return False
            return True

    return Handler


@contextlib.contextmanager
def serving(fake: FakeRegistry) -> Iterator[FakeRegistry]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    fake.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    with serving(FakeRegistry()) as f:
        yield f


def leftovers(store: Store) -> list[str]:
    """Every file under the store's root (manifests and blobs)."""
    if not store.root.exists():
        return []
    return sorted(
        p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file()
    )


def assert_no_model(store: Store, fake: FakeRegistry, partial_ok: bool = False) -> None:
    """No manifest and no blob of the failed pull; at most its resumable partial files."""
    files = leftovers(store)
    assert not [f for f in files if f.startswith("manifests/")], files
    assert not store.has_blob(fake.model)
    partial = f"blobs/sha256-{fake.model[7:]}-partial"
    rest = [f for f in files if not (partial_ok and f.startswith(partial))]
    # the config blob may have come in before the model failed: that is a whole, verified blob
    assert rest in ([], [f"blobs/sha256-{_digest(fake.config)[7:]}"]), files


# (mode, extra options, error type, message, model-blob GETs the server may see)
FAILURES = [
    ("416", {}, RegistryError, "refused a byte range of .* again", 2),
    ("self-redirect", {}, RegistryError, "redirect loop", 1),
    ("redirect-chain", {}, RegistryError, "more than 10 redirects", 11),
    ("500", {}, RegistryError, "answered 500", 3),
    ("truncate", {}, DownloadError, "part 0 failed after 3 attempt.*pull again to resume", 4),
    ("wrong-digest", {}, DownloadError, r"digest mismatch .* in 2 download\(s\)", 4),
    ("long-part", {}, RegistryError, "with Content-Length 66536", 2),
    (
        "drip",
        dict(min_rate=1000.0, rate_window=0.2),
        DownloadError,
        "part 0 failed after 3 attempt.*too slowly",
        4,
    ),
]


@pytest.mark.parametrize("mode,extra,error,message,gets", FAILURES, ids=[f[0] for f in FAILURES])
def test_misbehaving_registry_gives_a_bounded_clear_error(
    fake: FakeRegistry,
    tmp_path: Path,
    mode: str,
    extra: dict[str, Any],
    error: type[HerdError],
    message: str,
    gets: int,
) -> None:
    fake.mode = mode
    store = Store(tmp_path / "models")
    started = time.monotonic()
    with pytest.raises(error, match=message):
        pull(store, fake.name, Options(**{**FAST, **extra}))
    assert time.monotonic() - started < 10
    assert len(fake.model_requests()) == gets, fake.log
    assert_no_model(store, fake, partial_ok=mode in ("truncate", "drip"))


def test_interrupted_pull_leaves_only_resumable_partial_files(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    fake.mode = "truncate"
    store = Store(tmp_path / "models")
    with pytest.raises(DownloadError, match="pull again to resume"):
        pull(store, fake.name, Options(**FAST))
    (state,) = store.blobs_dir.glob(f"sha256-{fake.model[7:]}-partial-*")
    saved = json.loads(state.read_bytes())
    assert saved == {"N": 0, "Offset": 0, "Size": len(BLOB), "Completed": 3 * fake.cut_at}
    # the registry heals: the pull asks only for the rest and verifies the whole
    fake.mode, fake.log[:] = "", []
    ref = pull(store, fake.name, Options(**FAST))
    assert ref.model_path.read_bytes() == BLOB
    assert fake.model_requests() == ["bytes=0-0", f"bytes={3 * fake.cut_at}-{len(BLOB) - 1}"]
    assert not list(store.blobs_dir.glob("*partial*"))


def test_416_on_a_resumed_range_restarts_the_blob_once(fake: FakeRegistry, tmp_path: Path) -> None:
    """A partial file the registry's copy does not match: the resumed range gets 416, the
    blob starts over from 0 (once) and the pull succeeds."""
    fake.mode = "416-resume"
    store = Store(tmp_path / "models")
    store.blobs_dir.mkdir(parents=True)
    partial = store.blobs_dir / f"sha256-{fake.model[7:]}-partial"
    partial.write_bytes(b"\0" * len(BLOB))
    write_part(Path(f"{partial}-0"), Part(0, 0, len(BLOB), 1000))
    ref = pull(store, fake.name, Options(**FAST))
    assert ref.model_path.read_bytes() == BLOB
    assert fake.model_requests() == [
        "bytes=0-0",
        f"bytes=1000-{len(BLOB) - 1}",  # refused
        "bytes=0-0",
        f"bytes=0-{len(BLOB) - 1}",
    ]
    assert len(fake.model_requests("HEAD")) == 1  # the restart asks for the size again


def test_500_on_the_manifest_is_retried_a_bounded_number_of_times(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    fake.mode = "500-manifest"
    store = Store(tmp_path / "models")
    with pytest.raises(RegistryError, match="answered 500 Internal Server Error to GET"):
        pull(store, fake.name, Options(**FAST))
    assert len([x for x in fake.log if x[1].endswith("/manifests/1")]) == FAST["max_retries"]
    assert leftovers(store) == []


HUGE = [
    # (manifest size, HEAD size, message): refused before any file or part is made
    (2**63, None, "claims 9223372036854775808 bytes, more than herd accepts"),
    (len(BLOB), 10**12, "registry says 1000000000000 bytes, manifest says 65536"),
    (0, 2**63, "is 9223372036854775808 bytes, more than herd accepts"),
]


@pytest.mark.parametrize(
    "manifest_size,head_size,message", HUGE, ids=["manifest", "head-vs-manifest", "head"]
)
def test_huge_sizes_are_refused_before_anything_is_written(
    fake: FakeRegistry,
    tmp_path: Path,
    manifest_size: int,
    head_size: int | None,
    message: str,
) -> None:
    fake.manifest_size, fake.head_size = manifest_size, head_size
    store = Store(tmp_path / "models")
    with pytest.raises(HerdError, match=message):
        pull(store, fake.name, Options(**FAST))
    assert fake.model_requests() == []  # no part planned, no byte asked for
    assert_no_model(store, fake)


def test_a_blob_larger_than_the_free_space_is_refused_before_writing(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    store = Store(tmp_path / "models")
    fake.manifest_size = store.free_space() + 1
    with pytest.raises(DownloadError, match="no space left on device"):
        pull(store, fake.name, Options(**FAST, max_blob=1 << 62))
    assert fake.log == [("GET", f"/v2/{NAME.split(':')[0]}/manifests/1", "")]
    assert leftovers(store) == []


def test_part_plans_are_bounded() -> None:
    tiny = Options(part_min=1, part_max=1, parts=16)
    for total in (0, 1, 5 * MAX_PARTS + 3, 1 << 40):
        parts = plan_parts(total, tiny)
        assert len(parts) <= MAX_PARTS
        assert sum(p.size for p in parts) == total
        assert all(p.offset == sum(q.size for q in parts[: p.n]) for p in parts[:50])


def test_saved_part_states_are_trusted_only_when_consistent(tmp_path: Path) -> None:
    partial = tmp_path / "sha256-x-partial"
    write_part(Path(f"{partial}-0"), Part(0, 0, 10, 4))
    write_part(Path(f"{partial}-1"), Part(1, 10, 10, 0))
    assert read_parts(partial, 20) == [Part(0, 0, 10, 4), Part(1, 10, 10, 0)]
    assert read_parts(partial, 21) is None  # not the size the manifest says
    write_part(Path(f"{partial}-1"), Part(1, 10, 10, 11))  # more done than the part holds
    assert read_parts(partial, 20) is None
