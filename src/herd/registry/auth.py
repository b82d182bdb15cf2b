"""Bearer-token challenges, and the ed25519 request signature Ollama's registry expects.

A 401 carries `WWW-Authenticate: Bearer realm="…",service="…",scope="…"`. The client asks
the realm for a token (`GET realm?service=…&scope=…&ts=…&nonce=…`). When the user has an
Ollama key (`~/.ollama/id_ed25519`, see envconfig.registry_key) the request is signed the
way Ollama signs it, so ollama.com recognizes the same account; the signature is only ever
sent to the registry's own host. Without a key the token request is anonymous, which is
what public pulls and ordinary token servers need.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import struct
import time
from pathlib import Path

import httpx

from herd import envconfig
from herd.errors import RegistryError

_PARAM = re.compile(r'(\w+)="([^"]*)"')
MAX_TOKEN_BODY = 1 << 20  # a token answer is a few kB; more is a broken or hostile server


def parse_challenge(header: str) -> dict[str, str]:
    """The parameters of a `Bearer realm="…",service="…",scope="…"` challenge."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise RegistryError(
            f"registry asks for {scheme or 'unknown'} authentication; herd "
            "supports bearer-token challenges only",
            401,
        )
    params = dict(_PARAM.findall(rest))
    if not params.get("realm"):
        raise RegistryError(f"registry's auth challenge has no realm: {header!r}", 401)
    return params


def fetch_token(
    http: httpx.Client,
    header: str,
    request_url: httpx.URL,
    insecure: bool = False,
    key_path: Path | None = None,
) -> str:
    """Ask the challenge's realm for a token for `request_url`."""
    params = parse_challenge(header)
    realm = httpx.URL(params["realm"])
    query = [("service", params.get("service", ""))]
    query += [("scope", s) for s in params.get("scope", "").split(" ") if s]
    query += [
        ("ts", str(int(time.time()))),
        ("nonce", base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")),
    ]
    url = realm.copy_merge_params(query)
    if realm.scheme != "https" and not insecure:
        raise RegistryError(f"token realm {realm} is not https; pass --insecure to allow it", 401)
    headers = {}
    key = key_path or envconfig.registry_key()
    if key.is_file():
        if url.host != request_url.host or url.port != request_url.port:
            raise RegistryError(
                f"realm host {url.netloc.decode()!r} does not match registry "
                f"host {request_url.netloc.decode()!r}",
                401,
            )
        empty = base64.b64encode(hashlib.sha256(b"").hexdigest().encode()).decode()
        headers["Authorization"] = sign_request(key, f"GET,{url},{empty}".encode())
    try:
        with http.stream("GET", url, headers=headers) as resp:
            data = bytearray()
            for chunk in resp.iter_bytes():
                data += chunk
                if len(data) > MAX_TOKEN_BODY:
                    raise RegistryError(
                        f"token server {realm.host} sent more than {MAX_TOKEN_BODY} bytes", 401
                    )
    except httpx.HTTPError as e:
        raise RegistryError(f"cannot reach token server {realm.host}: {e}", 401) from e
    if resp.status_code >= 400:
        text = bytes(data[:200]).decode("utf-8", "replace").strip()
        raise RegistryError(
            f"token server {realm.host} answered {resp.status_code}{': ' + text if text else ''}",
            401,
        )
    try:
        body = json.loads(data)
        token = body.get("token") or body.get("access_token")
    except (ValueError, AttributeError):
        token = None
    if not isinstance(token, str) or not token:
        raise RegistryError(f"token server {realm.host} sent no token", 401)
    return token


# ---------------------------------------------------------------- OpenSSH ed25519 keys


def _read_string(data: bytes, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from(">I", data, pos)
    return data[pos + 4 : pos + 4 + n], pos + 4 + n


def load_key(path: Path) -> tuple[bytes, bytes]:
    """(seed, public key) of an unencrypted OpenSSH ed25519 private key file."""
    text = path.read_text()
    body = "".join(line for line in text.splitlines() if line and not line.startswith("-----"))
    data = base64.b64decode(body)
    magic = b"openssh-key-v1\0"
    if not data.startswith(magic):
        raise RegistryError(f"{path}: not an OpenSSH private key")
    pos = len(magic)
    cipher, pos = _read_string(data, pos)
    _kdf, pos = _read_string(data, pos)
    _opts, pos = _read_string(data, pos)
    if cipher != b"none":
        raise RegistryError(f"{path}: encrypted keys are not supported")
    pos += 4  # number of keys
    _pub, pos = _read_string(data, pos)
    priv, pos = _read_string(data, pos)
    p = 8  # two check words
    kind, p = _read_string(priv, p)
    if kind != b"ssh-ed25519":
        raise RegistryError(f"{path}: not an ed25519 key ({kind.decode(errors='replace')})")
    pub, p = _read_string(priv, p)
    secret, p = _read_string(priv, p)
    return secret[:32], pub


def sign_request(path: Path, data: bytes) -> str:
    """Ollama's `auth.Sign`: "<base64 ssh public key blob>:<base64 signature>"."""
    seed, pub = load_key(path)
    blob = _ssh_string(b"ssh-ed25519") + _ssh_string(pub)
    return f"{base64.b64encode(blob).decode()}:{base64.b64encode(sign(seed, data)).decode()}"


def _ssh_string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


# ---------------------------------------------------------------- ed25519 (RFC 8032)
# One signature per token request: a few milliseconds in pure Python, no dependency.

_P = 2**255 - 19
_Q = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
Point = tuple[int, int, int, int]


def _add(a: Point, b: Point) -> Point:
    x = (a[1] - a[0]) * (b[1] - b[0]) % _P
    y = (a[1] + a[0]) * (b[1] + b[0]) % _P
    c = 2 * a[3] * b[3] * _D % _P
    d = 2 * a[2] * b[2] % _P
    e, f, g, h = y - x, d - c, d + c, y + x
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _mul(s: int, pt: Point) -> Point:
    out: Point = (0, 1, 1, 0)
    while s:
        if s & 1:
            out = _add(out, pt)
        pt, s = _add(pt, pt), s >> 1
    return out


def _compress(pt: Point) -> bytes:
    zinv = pow(pt[2], _P - 2, _P)
    x, y = pt[0] * zinv % _P, pt[1] * zinv % _P
    return int.to_bytes(y | ((x & 1) << 255), 32, "little")


def _base() -> Point:
    y = 4 * pow(5, _P - 2, _P) % _P
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if x & 1:
        x = _P - x
    return x, y, 1, x * y % _P


_G = _base()


def _h(data: bytes) -> int:
    return int.from_bytes(hashlib.sha512(data).digest(), "little") % _Q


def public_key(seed: bytes) -> bytes:
    h = hashlib.sha512(seed).digest()
    a = (int.from_bytes(h[:32], "little") & ((1 << 254) - 8)) | (1 << 254)
    return _compress(_mul(a, _G))


def sign(seed: bytes, msg: bytes) -> bytes:
    """The 64-byte ed25519 signature of `msg` with the 32-byte secret `seed`."""
    h = hashlib.sha512(seed).digest()
    a = (int.from_bytes(h[:32], "little") & ((1 << 254) - 8)) | (1 << 254)
    pub = _compress(_mul(a, _G))
    r = _h(h[32:] + msg)
    big_r = _compress(_mul(r, _G))
    s = (r + _h(big_r + pub + msg) * a) % _Q
    return big_r + int.to_bytes(s, 32, "little")
