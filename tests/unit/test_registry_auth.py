"""Registry auth pieces: bearer challenges, ed25519 (RFC 8032 vectors), OpenSSH keys."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest

from herd.errors import RegistryError
from herd.registry import auth

# RFC 8032 section 7.1, tests 1 and 2: (secret, public, message, signature)
VECTORS = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e3970"
        "1cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613"
        "d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
]


@pytest.mark.parametrize("secret,public,message,signature", VECTORS, ids=["empty", "one-byte"])
def test_ed25519_rfc8032(secret: str, public: str, message: str, signature: str) -> None:
    seed = bytes.fromhex(secret)
    assert auth.public_key(seed).hex() == public
    assert auth.sign(seed, bytes.fromhex(message)).hex() == signature


@pytest.mark.parametrize(
    "header,expected",
    [
        (
            'Bearer realm="https://r.io/token",service="r.io",scope="repository:a/b:pull"',
            {"realm": "https://r.io/token", "service": "r.io", "scope": "repository:a/b:pull"},
        ),
        (
            'bearer realm="https://r.io/t",scope="repository:a/b:pull,push repository:c/d:pull"',
            {"realm": "https://r.io/t", "scope": "repository:a/b:pull,push repository:c/d:pull"},
        ),
    ],
    ids=["docker", "two-scopes"],
)
def test_parse_challenge(header: str, expected: dict[str, str]) -> None:
    assert auth.parse_challenge(header) == expected


@pytest.mark.parametrize(
    "header,message",
    [
        ('Basic realm="x"', "supports bearer-token challenges only"),
        ('Bearer service="x"', "has no realm"),
        ("", "unknown authentication"),
    ],
    ids=["basic", "no-realm", "empty"],
)
def test_bad_challenges(header: str, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        auth.parse_challenge(header)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_openssh_key_signs_like_ollama(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    seed, pub = auth.load_key(key)
    assert auth.public_key(seed) == pub
    blob_b64, sig_b64 = auth.sign_request(key, b"GET,https://x/token,abc").split(":")
    assert blob_b64 == (tmp_path / "id_ed25519.pub").read_text().split()[1]
    assert base64.b64decode(sig_b64) == auth.sign(seed, b"GET,https://x/token,abc")
