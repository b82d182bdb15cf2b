"""ggml RPC servers named in HERD_RPC are checked before ggml connects (ggml aborts the
process on a server it cannot reach or that speaks another protocol): each failure is a
BackendError naming the server. Fake servers on loopback stand in for the bad ones; the
real two-server run is tests/integration/test_rpc.py."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from herd.errors import BackendError

rpc = pytest.importorskip("herd.ml.backends.ggml.rpc", reason="ggml-python not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def fake_server() -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """A one-connection TCP server on loopback that answers with `reply(conn)`."""
    threads: list[threading.Thread] = []
    socks: list[socket.socket] = []

    def start(reply: Callable[[socket.socket], None]) -> str:
        srv = socket.create_server(("127.0.0.1", 0))
        socks.append(srv)

        def run() -> None:
            conn, _ = srv.accept()
            with conn:
                reply(conn)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)
        return f"127.0.0.1:{srv.getsockname()[1]}"

    yield start
    for s in socks:
        s.close()


def _hello_reply(major: int, minor: int, patch: int) -> Callable[[socket.socket], None]:
    def reply(conn: socket.socket) -> None:
        request = conn.recv(1 + 8 + rpc.CAPS)
        assert request[0] == rpc.CMD_HELLO  # what ggml's client sends first
        assert struct.unpack("<Q", request[1:9])[0] == rpc.CAPS
        body = bytes([major, minor, patch, 0]) + bytes(rpc.CAPS)
        conn.sendall(struct.pack("<Q", len(body)) + body)

    return reply


def test_a_server_of_this_protocol_passes(fake_server):
    endpoint = fake_server(_hello_reply(rpc.PROTO_MAJOR, rpc.PROTO_MINOR, 3))
    assert rpc.hello(endpoint) == (rpc.PROTO_MAJOR, rpc.PROTO_MINOR, 3)
    rpc.check(fake_server(_hello_reply(rpc.PROTO_MAJOR, rpc.PROTO_MINOR, 3)))


@pytest.mark.parametrize("version", [(rpc.PROTO_MAJOR - 1, 0, 0), (rpc.PROTO_MAJOR, 9, 0)])
def test_another_protocol_version_is_refused_naming_the_server(fake_server, version):
    endpoint = fake_server(_hello_reply(*version))
    with pytest.raises(BackendError, match=rf"RPC server {endpoint} speaks ggml RPC protocol"):
        rpc.check(endpoint)


def test_a_server_that_is_not_ggml_rpc_is_refused(fake_server):
    endpoint = fake_server(lambda c: c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    with pytest.raises(BackendError, match=rf"RPC server {endpoint} did not answer"):
        rpc.check(endpoint)


def test_a_server_that_closes_at_once_is_refused(fake_server):
    endpoint = fake_server(lambda c: None)
    with pytest.raises(BackendError, match=rf"RPC server {endpoint} did not answer"):
        rpc.check(endpoint)


def test_an_unreachable_server_is_named():
    endpoint = f"127.0.0.1:{_free_port()}"  # nothing listens there
    with pytest.raises(BackendError, match=rf"RPC server {endpoint} cannot be reached"):
        rpc.check(endpoint)


def test_an_unknown_host_is_named():
    with pytest.raises(BackendError, match="RPC server no-such-host.invalid:50052 cannot"):
        rpc.check("no-such-host.invalid:50052")


@pytest.mark.parametrize("spec", ["localhost", "host:", ":50052", "host:port", "h:70000"])
def test_malformed_endpoints_are_refused(spec):
    with pytest.raises(BackendError, match="expected host:port"):
        rpc.parse(spec)


def test_loading_with_an_unreachable_server_fails_before_ggml_connects(tiny_llama_path):
    """A load names the server instead of ggml aborting the process."""
    from herd.gguf import open_gguf
    from herd.ml import BackendOptions, open_backend

    endpoint = f"127.0.0.1:{_free_port()}"
    with pytest.raises(BackendError, match=rf"RPC server {endpoint} cannot be reached"):
        open_backend("ggml", open_gguf(tiny_llama_path), BackendOptions(rpc_servers=(endpoint,)))
