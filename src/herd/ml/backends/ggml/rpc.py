"""ggml's RPC backend: layers on other machines' `rpc-server`s (HERD_RPC=host:port,...).

A remote server is one more ggml device: once registered it is listed beside the local
GPUs (as a GPU: ggml's RPC device says so whatever the remote runs), `herd.ml.layout`
places layers on it by `num_gpu` and its memory (read from the server), and the
scheduler sends each layer's activations there and back. Its weights are uploaded once at
load. `herd rpc-server` starts a server on this machine's CPU (`serve` below); llama.cpp's
`rpc-server` of the same ggml speaks the same protocol.

ggml aborts the whole process when a server cannot be reached or speaks another protocol
version, so every endpoint is first checked here with the protocol's own HELLO, and a
failure is a BackendError naming the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
import threading

from herd.errors import BackendError
from herd.ml.backends.ggml import _lib as L
from herd.ml.backends.ggml.devices import cpu_device, physical_cores

# ggml-rpc.h / ggml-rpc.cpp of the ggml herd builds (scripts/build_ggml.py): the protocol
# version a server must speak, the HELLO command and its capability bytes
PROTO_MAJOR, PROTO_MINOR = 7, 0
CMD_HELLO, CAPS = 14, 24
DEFAULT_PORT = 50052  # llama.cpp's rpc-server's
PROBE_TIMEOUT = 5.0

_added: set[str] = set()  # endpoints registered with ggml in this process


def parse(spec: str) -> tuple[str, int]:
    """host:port -> (host, port); BackendError when malformed. (ggml splits an endpoint
    at its first colon: an IPv6 address needs a host name.)"""
    host, sep, port = spec.strip().partition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BackendError(f"RPC server {spec!r}: expected host:port (e.g. 10.0.0.2:50052)")
    return host, int(port)


def hello(endpoint: str, timeout: float = PROBE_TIMEOUT) -> tuple[int, int, int]:
    """The protocol version the server at `endpoint` speaks, asked as ggml asks it; a
    BackendError naming the host when it cannot be reached or is not a ggml RPC server."""
    host, port = parse(endpoint)
    try:
        s = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:  # refused, unreachable, unknown host, timed out
        raise BackendError(f"RPC server {endpoint} cannot be reached: {e}") from None
    body = b""
    with s, contextlib.suppress(OSError):  # reset or silent: "did not answer" below
        s.sendall(bytes([CMD_HELLO]) + struct.pack("<Q", CAPS) + bytes(CAPS))
        head = _recv(s, 8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        body = _recv(s, size) if 4 <= size <= 4096 else b""
    if len(body) < 4:
        raise BackendError(
            f"RPC server {endpoint} did not answer as a ggml RPC server of protocol "
            f"{PROTO_MAJOR}.x (another program on that port, or an older ggml)"
        )
    return body[0], body[1], body[2]


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        part = s.recv(n - len(out))
        if not part:
            break
        out += part
    return out


def check(endpoint: str) -> None:
    """BackendError unless the server speaks this ggml's protocol (ggml's own rule: the
    same major version, a minor no newer than ours)."""
    major, minor, patch = hello(endpoint)
    if major != PROTO_MAJOR or minor > PROTO_MINOR:
        raise BackendError(
            f"RPC server {endpoint} speaks ggml RPC protocol {major}.{minor}.{patch}, this "
            f"herd {PROTO_MAJOR}.{PROTO_MINOR}: run the same herd (or llama.cpp's ggml) there"
        )


def _fn(name: str, restype: object, *argtypes: object) -> ctypes._CFuncPtr:
    try:
        return L._f(name, restype, *argtypes)
    except ImportError:
        raise BackendError(
            "this ggml was built without its RPC backend; rebuild with `make install` "
            "(scripts/build_ggml.py adds -DGGML_RPC=ON)"
        ) from None


def add_servers(endpoints: tuple[str, ...]) -> None:
    """Register each server's devices with ggml (once per process), checking each first,
    every time (a server may have gone away since); they then appear in
    `probe_devices(endpoints)`."""
    for endpoint in endpoints:
        check(endpoint)
        if endpoint in _added:
            continue
        reg = _fn("ggml_backend_rpc_add_server", L.P, L.S)(endpoint.encode())
        if not reg:
            raise BackendError(f"RPC server {endpoint} offers no devices")
        _fn("ggml_backend_register", None, L.P)(reg)
        _added.add(endpoint)


def serve(host: str, port: int, num_thread: int, cache_dir: str | None = None) -> None:
    """Serve this machine's CPU to RPC clients until the process ends (blocks; ggml
    serves one client connection at a time). `cache_dir`: large tensors kept on disk by
    hash, so a client that loads the same model again sends hashes, not weights."""
    start = _fn("ggml_backend_rpc_start_server", None, L.S, L.S, L.Z, L.Z, ctypes.POINTER(L.P))
    num_thread = num_thread or physical_cores()
    devices = (L.P * 1)(cpu_device())
    endpoint = f"{host}:{port}"
    parse(endpoint)
    args = (endpoint.encode(), cache_dir.encode() if cache_dir else None, num_thread, 1, devices)
    # ggml's loop blocks in C, where Ctrl-C cannot reach it: it runs in a thread of its own
    # and this one waits, so an interrupt ends the process (ctypes lets go of the GIL)
    server = threading.Thread(target=start, args=args, daemon=True, name="ggml-rpc")
    server.start()
    while server.is_alive():
        server.join(0.5)
    raise BackendError(f"RPC server on {endpoint} could not start (is the port in use?)")
