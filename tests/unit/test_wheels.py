"""The catalog's wheel downloader (no pip): a fake package index, served over real HTTP.

`IndexServer` plays PyPI's simple API (PEP 691 JSON, or PEP 503 HTML) for wheels the test
builds with `zipfile`; it can lie about a hash, throttle, or hang up halfway. Other CLI
tests import it to serve the cached real wheels.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from herd.errors import DownloadError
from herd.store.wheels import STALE_FETCH_S, PackageIndex, WheelCache, normalize


def wheel_bytes(project: str, version: str, members: dict[str, bytes]) -> tuple[str, bytes]:
    """(file name, bytes) of a wheel holding `members`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return f"{normalize(project)}-{version}-py3-none-any.whl", buf.getvalue()


class IndexServer:
    """A simple-API package index on 127.0.0.1 for `files` ({file name: bytes or Path})."""

    def __init__(self, files: dict[str, bytes | Path], *, html: bool = False) -> None:
        self.files, self.html = files, html
        self.sha: dict[str, str] = {}
        for name, data in files.items():
            h = hashlib.sha256()
            if isinstance(data, Path):
                with open(data, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
            else:
                h.update(data)
            self.sha[name] = h.hexdigest()
        self.rate: float | None = None  # bytes per second
        self.cut_at: int | None = None  # hang up after this many bytes of a file
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                if self.path.startswith("/simple/"):
                    self._index(self.path.strip("/").split("/")[1])
                elif self.path.startswith("/files/"):
                    self._file(self.path.rsplit("/", 1)[1])
                else:
                    self.send_error(404)

            def _index(self, project: str) -> None:
                mine = [n for n in server.files if n.startswith(normalize(project) + "-")]
                if not mine:
                    self.send_error(404)
                    return
                if server.html:
                    links = "".join(
                        f'<a href="../../files/{n}#sha256={server.sha[n]}">{n}</a><br>\n'
                        for n in mine
                    )
                    body, kind = f"<html><body>{links}</body></html>".encode(), "text/html"
                else:
                    listing = {
                        "meta": {"api-version": "1.1"},
                        "name": project,
                        "files": [
                            {
                                "filename": n,
                                "url": f"/files/{n}",
                                "hashes": {"sha256": server.sha[n]},
                                "size": server.size(n),
                            }
                            for n in mine
                        ],
                    }
                    body = json.dumps(listing).encode()
                    kind = "application/vnd.pypi.simple.v1+json"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, name: str) -> None:
                if name not in server.files:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(server.size(name)))
                self.end_headers()
                sent, t0 = 0, time.monotonic()
                for chunk in server.chunks(name):
                    if server.cut_at is not None and sent + len(chunk) > server.cut_at:
                        self.wfile.write(chunk[: server.cut_at - sent])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    if server.rate:  # sleep until `sent` bytes are due
                        time.sleep(max(0.0, sent / server.rate - (time.monotonic() - t0)))

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/simple/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def size(self, name: str) -> int:
        data = self.files[name]
        return data.stat().st_size if isinstance(data, Path) else len(data)

    def chunks(self, name: str) -> Iterator[bytes]:
        data = self.files[name]
        if isinstance(data, Path):
            with open(data, "rb") as f:
                while chunk := f.read(1 << 18):
                    yield chunk
        else:
            for i in range(0, len(data), 1 << 12):
                yield data[i : i + (1 << 12)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def tiny() -> tuple[str, bytes]:
    return wheel_bytes("tiny-pkg", "1.0", {"tiny_pkg/m.bin": os.urandom(3_000_000)})


@pytest.fixture
def index(tiny: tuple[str, bytes]) -> Iterator[IndexServer]:
    server = IndexServer({tiny[0]: tiny[1]})
    yield server
    server.close()


def _cache_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def test_download_checks_hash_reports_bytes_and_caches(
    tmp_path: Path, index: IndexServer, tiny: tuple[str, bytes]
) -> None:
    events: list[tuple[Any, ...]] = []
    cache = WheelCache(tmp_path / "wheels", PackageIndex(index.url))
    path = cache.get("tiny-pkg", "1.0", lambda *e: events.append(e))
    assert path == tmp_path / "wheels" / tiny[0]  # pip's layout: old caches still hit
    assert path.read_bytes() == tiny[1]
    assert _cache_files(tmp_path / "wheels") == [tiny[0]]
    status, digest = "downloading tiny-pkg==1.0", f"sha256:{index.sha[tiny[0]]}"
    assert events[0] == (status, None, None, None)
    moving = events[1:]
    assert all(e[:3] == (status, digest, len(tiny[1])) for e in moving)
    done = [e[3] for e in moving]
    assert done == sorted(done) and done[0] == 0 and done[-1] == len(tiny[1]) and len(done) > 2
    # a second get is a cache hit: the index is not asked again
    asked = len(index.requests)
    assert cache.get("tiny-pkg", "1.0") == path and len(index.requests) == asked


def test_html_index(tmp_path: Path, tiny: tuple[str, bytes]) -> None:
    server = IndexServer({tiny[0]: tiny[1]}, html=True)
    try:
        path = WheelCache(tmp_path, PackageIndex(server.url)).get("Tiny_Pkg", "1.0")
        assert path.read_bytes() == tiny[1]
        assert server.requests[0] == "/simple/tiny-pkg/"  # PEP 503's normalized name
    finally:
        server.close()


def test_hash_mismatch_leaves_nothing(tmp_path: Path, index: IndexServer, tiny: tuple[str, bytes]):
    index.sha[tiny[0]] = "0" * 64
    cache = WheelCache(tmp_path / "wheels", PackageIndex(index.url))
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        cache.get("tiny-pkg", "1.0")
    assert _cache_files(tmp_path / "wheels") == []


def test_interrupted_download_leaves_nothing(
    tmp_path: Path, index: IndexServer, tiny: tuple[str, bytes]
) -> None:
    index.cut_at = len(tiny[1]) // 2
    cache = WheelCache(tmp_path / "wheels", PackageIndex(index.url))
    with pytest.raises(DownloadError, match="downloading tiny_pkg-1.0"):
        cache.get("tiny-pkg", "1.0")
    assert _cache_files(tmp_path / "wheels") == []
    index.cut_at = None  # the next pull starts clean and succeeds
    assert cache.get("tiny-pkg", "1.0").read_bytes() == tiny[1]


def test_ctrl_c_leaves_nothing(tmp_path: Path, index: IndexServer) -> None:
    def progress(status: str, digest: Any, total: Any, completed: Any) -> None:
        if completed:
            raise KeyboardInterrupt

    cache = WheelCache(tmp_path / "wheels", PackageIndex(index.url))
    with pytest.raises(KeyboardInterrupt):
        cache.get("tiny-pkg", "1.0", progress)
    assert _cache_files(tmp_path / "wheels") == []


def test_unknown_project_or_version(tmp_path: Path, index: IndexServer) -> None:
    cache = WheelCache(tmp_path, PackageIndex(index.url))
    with pytest.raises(DownloadError, match="package nope not found on the package index"):
        cache.get("nope", "1.0")
    with pytest.raises(DownloadError, match=r"no wheel of tiny-pkg==2\.0"):
        cache.get("tiny-pkg", "2.0")
    assert _cache_files(tmp_path) == []


def test_no_network_is_a_download_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = WheelCache(tmp_path, PackageIndex(f"http://127.0.0.1:{port}/simple"))
    with pytest.raises(DownloadError, match="is the network up"):
        cache.get("tiny-pkg", "1.0")
    assert _cache_files(tmp_path) == []


def test_index_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HERD_PYPI_URL", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    assert PackageIndex().url == "https://pypi.org/simple/"
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/pypi/simple")
    assert PackageIndex().url == "https://mirror.example/pypi/simple/"
    monkeypatch.setenv("HERD_PYPI_URL", "http://127.0.0.1:1/simple/")
    assert PackageIndex().url == "http://127.0.0.1:1/simple/"


def test_stale_fetch_folders_are_removed(tmp_path: Path, index: IndexServer) -> None:
    stale, live = tmp_path / ".fetch-old", tmp_path / ".fetch-live"
    for d in (stale, live):
        d.mkdir()
        (d / "x.whl.part").write_bytes(b"x")
    old = time.time() - STALE_FETCH_S - 60
    os.utime(stale / "x.whl.part", (old, old))
    os.utime(stale, (old, old))
    WheelCache(tmp_path, PackageIndex(index.url)).get("tiny-pkg", "1.0")
    assert not stale.exists() and live.exists()
