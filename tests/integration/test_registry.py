"""Pull and push against a real registry: Debian's `docker-registry` (CNCF distribution).

A session fixture starts it on a free loopback port with a temporary storage folder. A
small proxy in front of it (written here, no mocks of herd) adds what the real server does
not do on its own: bearer-token auth, connections dropped mid-blob, corrupted bytes,
error statuses, redirects to another host, manifests that lie.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import gguf
import httpx
import numpy as np
import pytest

from herd.errors import DownloadError, HerdError, InvalidNameError, ModelNotFoundError
from herd.modelfile import parse
from herd.registry import Options, pull, push
from herd.store import Store
from herd.store.create import create
from herd.store.layout import Manifest

FAST = dict(insecure=True, backoff=0.01, max_retries=2, timeout=10.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a fresh docker-registry (no auth), stopped after the session."""
    exe = shutil.which("docker-registry")
    if exe is None:
        pytest.skip(
            "docker-registry is not installed (Debian package docker-registry; "
            "`make test` installs it when run as root)"
        )
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    config = root / "config.yml"
    config.write_text(
        f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = open(root / "log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([exe, "serve", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"docker-registry did not start: {(root / 'log').read_text()}")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


# ---------------------------------------------------------------- the proxy


@dataclass
class Proxy:
    """Forwards to the registry; each knob adds one misbehaviour."""

    upstream: str
    token: str | None = None  # require `Authorization: Bearer <token>` on /v2/
    drop_after: int | None = None  # blob bodies: close the connection after this many bytes
    drops: int = 0  # how many blob responses to cut (-1: all)
    corrupt: bool = False  # flip one byte of every blob body
    overrides: dict[tuple[str, str], tuple[int, dict[str, str], bytes]] = field(
        default_factory=dict
    )
    log: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, Range
    port: int = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


def _handler(p: Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _reply(
            self, status: int, headers: dict[str, str], body: bytes, cut: int | None = None
        ) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if "content-length" not in {k.lower() for k in headers}:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body if cut is None else body[:cut])
            if cut is not None:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)

        def _any(self) -> None:
            path = self.path.split("?")[0]
            p.log.append((self.command, path, self.headers.get("Range", "")))
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if (self.command, path) in p.overrides:
                self._reply(*p.overrides[(self.command, path)])
                return
            if path == "/token":
                self._reply(
                    200,
                    {"Content-Type": "application/json"},
                    json.dumps({"token": p.token}).encode(),
                )
                return
            target = self.path
            if path.startswith("/cdn/"):  # another host serving blobs (reached as localhost)
                path, target = path.removeprefix("/cdn"), target.removeprefix("/cdn")
            elif p.token and self.headers.get("Authorization") != f"Bearer {p.token}":
                challenge = (
                    f'Bearer realm="http://{p.host}/token",service="test",'
                    f'scope="repository:me/m:pull,push"'
                )
                self._reply(401, {"WWW-Authenticate": challenge}, b'{"errors":[]}')
                return
            headers = {
                k: v
                for k, v in self.headers.items()
                if k.lower() not in ("host", "content-length", "authorization")
            }
            resp = httpx.request(
                self.command,
                f"http://{p.upstream}{target}",
                headers={**headers, "Host": p.host},
                content=body,
            )
            out = {
                k: v
                for k, v in resp.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }
            data = resp.content
            cut = None
            if self.command == "GET" and "/blobs/sha256:" in path and data:
                if p.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                if p.drop_after is not None and p.drops != 0 and len(data) > p.drop_after:
                    p.drops -= 1
                    cut = p.drop_after
            if self.command == "HEAD":
                out["Content-Length"] = resp.headers.get("content-length", "0")
            self._reply(resp.status_code, out, data, cut)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any

    return Handler


@pytest.fixture
def proxy(registry: str) -> Iterator[Proxy]:
    p = Proxy(registry)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(p))
    p.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield p
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------- models to move


def write_gguf(path: Path, extra: dict[str, str]) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in extra.items():
        w.add_string(key, value)
    w.add_tensor("token_embd.weight", np.arange(128, dtype=np.float32).reshape(16, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def small_model(tmp_path: Path, store: Store, name: str, system: str = "Be brief.") -> bytes:
    """A tiny created model; returns its manifest bytes."""
    write_gguf(tmp_path / "tiny.gguf", extra={"general.name": name})
    text = (
        f"FROM ./tiny.gguf\nSYSTEM {system}\nPARAMETER temperature 0.5\n"
        "LICENSE MIT\nMESSAGE user Hi\n"
    )
    create(store, name, parse(text), base_dir=tmp_path)
    return store.read_manifest(name)[1]


def blobs(store: Store) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in store.blobs_dir.iterdir()}


def test_round_trip_runs(registry: str, tmp_path: Path, smollm2_path: Path) -> None:
    """create (template, system, params, license, messages) -> push -> rm -> pull -> run."""
    import herd

    store = Store()  # HERD_MODELS: the test's own store, which herd.load reads too
    name = f"{registry}/me/smol:rt"
    modelfile = (
        f"FROM {smollm2_path}\nTEMPLATE plain\nSYSTEM You are terse.\n"
        "PARAMETER temperature 0\nPARAMETER stop <|im_end|>\nPARAMETER num_ctx 256\n"
        'LICENSE """Apache 2.0\nsee LICENSE"""\nMESSAGE user Hi\n'
        "MESSAGE assistant Hello!\n"
    )
    create(store, name, parse(modelfile), base_dir=tmp_path)
    manifest_bytes = store.read_manifest(name)[1]
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in store.blobs_dir.iterdir()}
    steps: list[str] = []
    push(store, name, Options(insecure=True), lambda s, *a: steps.append(s))
    assert steps[0] == "retrieving manifest" and steps[-2:] == ["pushing manifest", "success"]
    store.delete(name)
    assert list(store.blobs_dir.iterdir()) == []
    steps.clear()
    ref = pull(store, name, Options(insecure=True), lambda s, *a: steps.append(s))
    assert store.read_manifest(name)[1] == manifest_bytes
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in store.blobs_dir.iterdir()}
    assert after == before and all(k == "sha256-" + v for k, v in after.items())
    assert steps[0] == "pulling manifest" and steps[-3:] == [
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    assert ref.system == "You are terse." and ref.license == ["Apache 2.0\nsee LICENSE"]
    llm = herd.load(name, backend="numpy")
    out = llm.generate("Hello", raw=True, options={"num_predict": 2})
    assert isinstance(out, dict) and out["eval_count"] == 2, out


def test_cross_repository_mount_and_existing_blobs(registry: str, tmp_path: Path) -> None:
    store = Store(tmp_path / "models")
    small_model(tmp_path, store, f"{registry}/me/base:1")
    text = f"FROM {registry}/me/base:1\nSYSTEM other\n"
    create(store, f"{registry}/you/derived:1", parse(text), base_dir=tmp_path)
    push(store, f"{registry}/me/base:1", Options(insecure=True))
    p = Proxy(registry)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(p))
    p.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # through the proxy, so the requests can be seen; names must match its host
        store.copy(f"{registry}/you/derived:1", f"{p.host}/you/derived:1")
        store.copy(f"{registry}/me/base:1", f"{p.host}/me/base:1")
        data = store.read_manifest(f"{p.host}/you/derived:1")[1]
        fixed = data.replace(
            f'"from":"{registry}/me/base:1"'.encode(), f'"from":"{p.host}/me/base:1"'.encode()
        )
        store.write_manifest(f"{p.host}/you/derived:1", fixed)
        push(store, f"{p.host}/you/derived:1", Options(insecure=True))
    finally:
        server.shutdown()
        server.server_close()
    posts = [x for x in p.log if x[0] == "POST"]
    patches = [x for x in p.log if x[0] == "PATCH"]
    derived = Manifest.from_bytes(fixed)
    base = store.read_manifest(f"{registry}/me/base:1")[0]
    inherited = [x for x in derived.all_layers() if x.from_]
    assert {x.digest for x in inherited} <= {x.digest for x in base.all_layers()}
    assert len(inherited) >= 3  # model, license, messages
    # every blob is asked for (HEAD) and started (POST), but only the layers not marked
    # `from` base upload bytes: the inherited ones are mounted from me/base
    assert len(posts) == len(derived.all_layers())
    assert len(patches) == len(derived.all_layers()) - len(inherited), p.log
    for layer in derived.all_layers():
        assert ("HEAD", f"/v2/you/derived/blobs/{layer.digest}", "") in p.log


def test_token_auth(proxy: Proxy, tmp_path: Path) -> None:
    proxy.token = "s3cret"
    store = Store(tmp_path / "models")
    name = f"{proxy.host}/me/m:1"
    data = small_model(tmp_path, store, name)
    push(store, name, Options(**FAST))
    store.delete(name)
    pull(store, name, Options(**FAST))
    assert store.read_manifest(name)[1] == data
    assert sum(1 for m, path, _ in proxy.log if path == "/token") >= 2  # once per client
    # a token the registry keeps refusing
    proxy.token = "rotated"
    proxy.overrides[("GET", "/token")] = (200, {}, json.dumps({"token": "stale"}).encode())
    with pytest.raises(HerdError, match="unauthorized"):
        pull(store, f"{proxy.host}/me/m:1", Options(**FAST))


def _pushed(
    proxy: Proxy, tmp_path: Path, tag: str, size: int = 300_000
) -> tuple[str, Store, bytes, str]:
    """A model with a model blob of `size` bytes pushed through the proxy; local copy removed."""
    store = Store(tmp_path / "models")
    write_gguf(tmp_path / "big.gguf", extra={"general.description": "x" * size})
    name = f"{proxy.host}/me/big:{tag}"
    create(store, name, parse("FROM ./big.gguf\nSYSTEM s"), base_dir=tmp_path)
    data = store.read_manifest(name)[1]
    model = Manifest.from_bytes(data).layers[0].digest
    push(store, name, Options(**FAST))
    store.delete(name)
    proxy.log.clear()
    return name, store, data, model


def test_interrupted_pull_resumes(proxy: Proxy, tmp_path: Path) -> None:
    name, store, data, model = _pushed(proxy, tmp_path, "resume")
    small_parts = dict(FAST, part_min=64 * 1024, parts=4)
    # every blob response is cut after 20 kB: the pull fails, keeping its partial file
    proxy.drop_after, proxy.drops = 20_000, -1
    with pytest.raises(DownloadError, match="pull again to resume"):
        pull(store, name, Options(**small_parts))
    partial = store.blobs_dir / f"sha256-{model[7:]}-partial"
    states = [json.loads(p.read_bytes()) for p in sorted(store.blobs_dir.glob(partial.name + "-*"))]
    assert (
        partial.is_file()
        and states
        and all(set(s) == {"N", "Offset", "Size", "Completed"} for s in states)
    )
    assert any(0 < s["Completed"] < s["Size"] for s in states), states
    assert not store.has_blob(model) and store.names() == []
    # the network heals: the next pull asks only for what is missing, and verifies it
    proxy.drop_after, proxy.drops = None, 0
    proxy.log.clear()
    pull(store, name, Options(**small_parts))
    assert store.read_manifest(name)[1] == data
    ranges = [r for m, path, r in proxy.log if m == "GET" and model in path and r != "bytes=0-0"]
    starts = {s["Offset"] + s["Completed"] for s in states if s["Completed"] < s["Size"]}
    assert {int(r.split("=")[1].split("-")[0]) for r in ranges} == starts
    assert hashlib.sha256(store.blob_path(model).read_bytes()).hexdigest() == model[7:]
    assert not list(store.blobs_dir.glob("*partial*"))


def test_dropped_connection_retried_within_pull(proxy: Proxy, tmp_path: Path) -> None:
    name, store, data, model = _pushed(proxy, tmp_path, "retry")
    proxy.drop_after, proxy.drops = 100_000, 1
    pull(store, name, Options(**FAST))
    assert store.read_manifest(name)[1] == data
    gets = [r for m, path, r in proxy.log if m == "GET" and model in path and r != "bytes=0-0"]
    assert len(gets) == 2 and gets[1].startswith("bytes=100000-")


def test_corrupted_blob_never_enters_store(proxy: Proxy, tmp_path: Path) -> None:
    name, store, _, model = _pushed(proxy, tmp_path, "corrupt")
    proxy.corrupt = True
    with pytest.raises(DownloadError, match="digest mismatch"):
        pull(store, name, Options(**FAST))
    assert store.names() == []
    assert not store.has_blob(model)
    assert not [p for p in store.blobs_dir.iterdir() if model[7:] in p.name]


def test_cdn_redirect_to_another_host(proxy: Proxy, tmp_path: Path) -> None:
    """Like registry.ollama.ai: a blob GET answers 307 to a storage host; parts go there."""
    name, store, data, model = _pushed(proxy, tmp_path, "cdn")
    blob = f"/v2/me/big/blobs/{model}"
    proxy.overrides[("GET", blob)] = (
        307,
        {"Location": f"http://localhost:{proxy.port}/cdn{blob}"},
        b"",
    )
    pull(store, name, Options(**FAST))
    assert store.read_manifest(name)[1] == data
    assert (
        "GET",
        f"/cdn{blob}",
        "bytes=0-" + str(len(store.blob_path(model).read_bytes()) - 1),
    ) in proxy.log


# (method, path suffix, status, headers, body, exception, message)
BAD_ANSWERS = [
    ("manifests/1", 404, {}, b"", ModelNotFoundError, "not found in registry"),
    ("manifests/1", 500, {}, b"boom", HerdError, "answered 500 Internal Server Error to GET"),
    ("manifests/1", 401, {}, b"", HerdError, "registry asks for unknown authentication"),
    (
        "manifests/1",
        401,
        {"WWW-Authenticate": 'Basic realm="x"'},
        b"",
        HerdError,
        "supports bearer-token challenges only",
    ),
    (
        "manifests/1",
        307,
        {"Location": "http://localhost:1/v2/x"},
        b"",
        HerdError,
        "redirected GET /v2/me/m/manifests/1 to another host",
    ),
    ("manifests/1", 200, {}, b"{not json", HerdError, "malformed manifest"),
]


@pytest.mark.parametrize(
    "suffix,status,headers,body,exc,message",
    BAD_ANSWERS,
    ids=["404", "500", "401-bare", "401-basic", "redirect", "garbage"],
)
def test_registry_errors_are_clear(
    proxy: Proxy,
    tmp_path: Path,
    suffix: str,
    status: int,
    headers: dict[str, str],
    body: bytes,
    exc: type,
    message: str,
) -> None:
    proxy.overrides[("GET", f"/v2/me/m/{suffix}")] = (status, headers, body)
    store = Store(tmp_path / "models")
    with pytest.raises(exc, match=message):
        pull(store, f"{proxy.host}/me/m:1", Options(**FAST))
    assert store.names() == []
    assert not store.blobs_dir.exists() or not list(store.blobs_dir.iterdir())


def _manifest_with(digest: str, size: int = 3) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": digest,
                "size": size,
            },
            "layers": [],
        }
    ).encode()


@pytest.mark.parametrize(
    "digest,message",
    [
        ("sha256:../../../../etc/passwd", "invalid digest"),
        ("sha256:" + "a" * 63, "invalid digest"),
        ("sha256:" + "g" * 64, "invalid digest"),
        ("sha512:" + "a" * 64, "invalid digest"),
        ("sha256:" + "ab" * 32, "not found in me/m"),  # well formed, but the registry lacks it
    ],
    ids=["traversal", "short", "not-hex", "algorithm", "missing-blob"],
)
def test_bad_manifests_write_nothing(
    proxy: Proxy, tmp_path: Path, digest: str, message: str
) -> None:
    proxy.overrides[("GET", "/v2/me/m/manifests/1")] = (200, {}, _manifest_with(digest))
    store = Store(tmp_path / "models")
    with pytest.raises(HerdError, match=message):
        pull(store, f"{proxy.host}/me/m:1", Options(**FAST))
    assert store.names() == []
    assert not store.blobs_dir.exists() or not list(store.blobs_dir.iterdir())


@pytest.mark.parametrize(
    "name", ["127.0.0.1:1/../m:1", "/abs/m:1", "h/ns/m:../../x", "h/ns/..:1", "h/n.s/m:1"]
)
def test_traversal_in_names_rejected(tmp_path: Path, name: str) -> None:
    store = Store(tmp_path / "models")
    with pytest.raises(InvalidNameError):
        pull(store, name, Options(**FAST))
    with pytest.raises(InvalidNameError):
        push(store, name, Options(**FAST))


def test_plain_http_needs_insecure(registry: str, tmp_path: Path) -> None:
    store = Store(tmp_path / "models")
    with pytest.raises(HerdError, match="pass --insecure"):
        pull(store, f"http://{registry}/me/m:1", Options())
    with pytest.raises(HerdError, match="plain-HTTP registry, pass --insecure"):
        pull(store, f"{registry}/me/m:1", Options(timeout=5))


def test_cli_pull_push(registry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from herd.cli.env import CliEnv
    from herd.cli.main import cli

    monkeypatch.setenv("HERD_MODELS", str(tmp_path / "models"))
    name = f"{registry}/me/cli:1"
    small_model(tmp_path, Store(), name)
    runner = CliRunner()
    r = runner.invoke(cli, ["push", "--insecure", name], obj=CliEnv())
    assert r.exit_code == 0, r.output
    runner.invoke(cli, ["rm", name], obj=CliEnv())
    r = runner.invoke(cli, ["pull", "--insecure", name], obj=CliEnv())
    assert r.exit_code == 0, r.output
    assert "success" in r.stderr and Store().resolve(name).system == "Be brief."
    r = runner.invoke(cli, ["pull", "--insecure", f"{registry}/me/none:1"], obj=CliEnv())
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: model '{registry}/me/none:1' not found in registry {registry}"
    )


def test_disk_full_during_pull_is_a_clear_error(proxy: Proxy, tmp_path: Path) -> None:
    """A store on a 1 MiB filesystem: the 3 MB blob does not fit; nothing enters the store."""
    name, _, _, model = _pushed(proxy, tmp_path, "full", size=3_000_000)
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs for the full disk")
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        tiny = Store(small / "models")
        with pytest.raises(DownloadError, match="disk full"):
            pull(tiny, name, Options(**FAST))
        assert tiny.names() == [] and not tiny.has_blob(model)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_disk_full_outside_the_part_downloads_is_a_clear_error(
    proxy: Proxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the disk fills depends on timing (a part's write, its state file, the flush
    when the blob file closes); every place gives the same clear error and an empty store."""
    import errno

    from herd.registry import download

    name, _, _, model = _pushed(proxy, tmp_path, "fullstate", size=300_000)

    def no_space(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "_write_part", no_space)
    store = Store(tmp_path / "store")
    with pytest.raises(DownloadError, match="disk full"):
        pull(store, name, Options(**FAST))
    assert store.names() == [] and not store.has_blob(model)
