"""Ollama's on-disk formats: digests, blob names, manifest and config JSON, atomic writes.

Nothing here knows about names or catalogs; `store.py` puts the pieces together.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

from herd.errors import DownloadError, HerdError

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_ADAPTER = "application/vnd.ollama.image.adapter"
MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"
MEDIA_DRAFT = "application/vnd.ollama.image.draft"  # a speculative-decoding draft model GGUF
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_PROMPT = "application/vnd.ollama.image.prompt"  # legacy name of the template layer
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_MESSAGES = "application/vnd.ollama.image.messages"
MEDIA_LICENSE = "application/vnd.ollama.image.license"

TEMP_PREFIX = ".herd-tmp-"  # never matches a blob name, so a crash can't fake a blob

_DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")


class DigestError(HerdError):
    """A string that is not a `sha256:<64 hex>` digest."""


def parse_digest(digest: str) -> str:
    """The lower-case hex of a `sha256:<hex>` (or `sha256-<hex>`) digest; DigestError else."""
    m = _DIGEST.fullmatch(digest)  # not match(): "$" would accept a trailing newline
    if not m:
        raise DigestError(f"invalid digest format: {digest!r}")
    return m.group(1).lower()


def blob_filename(digest: str) -> str:
    return "sha256-" + parse_digest(digest)


def go_json(obj: Any, sort_keys: bool = False) -> bytes:
    """JSON bytes as Go's json.Encoder writes them (compact, HTML-escaped, trailing newline).

    Ollama's manifest digest is the sha256 of the file bytes, so matching its encoder keeps
    IDs stable for manifests written by either tool. Go sorts map keys (`sort_keys`) but
    keeps struct fields in declaration order, and writes floats its own way (1, not 1.0).
    """
    text = _encode(obj, sort_keys)
    for ch, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(ch, esc)
    return (text + "\n").encode()


def go_float(f: float) -> str:
    """encoding/json's float format: shortest digits, 'e' only below 1e-6 or from 1e21."""
    if f != f or f in (float("inf"), float("-inf")):
        raise ValueError(f"JSON cannot hold {f}")
    if f == 0:
        return "0" if str(f)[0] != "-" else "-0"
    if 1e-6 <= abs(f) < 1e21:
        text = format(Decimal(repr(f)), "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    mantissa, _, exp = repr(f).partition("e")
    sign, digits = exp[0], exp[1:].lstrip("0")
    return f"{mantissa.removesuffix('.0')}e{sign}{digits.rjust(2, '0') if sign == '+' else digits}"


def _encode(obj: Any, sort_keys: bool) -> str:
    if isinstance(obj, dict):
        items = sorted(obj.items()) if sort_keys else obj.items()
        return (
            "{"
            + ",".join(
                json.dumps(str(k), ensure_ascii=False) + ":" + _encode(v, sort_keys)
                for k, v in items
            )
            + "}"
        )
    if isinstance(obj, list | tuple):
        return "[" + ",".join(_encode(v, sort_keys) for v in obj) + "]"
    if isinstance(obj, float):
        return go_float(obj)
    return json.dumps(obj, ensure_ascii=False)  # str, int, bool, None


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int
    from_: str = ""  # Ollama's `from`: the source model/path of a layer (optional)
    name: str = ""  # tensor layers only

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.from_:
            out["from"] = self.from_
        if self.name:
            out["name"] = self.name
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Layer:
        if not isinstance(obj, dict):
            raise HerdError(f"malformed manifest layer: {obj!r}")
        try:
            digest = str(obj["digest"])
            parse_digest(digest)
            return cls(
                str(obj["mediaType"]),
                digest,
                int(obj["size"]),
                str(obj.get("from", "")),
                str(obj.get("name", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise HerdError(f"malformed manifest layer: {obj!r}") from e


@dataclass(frozen=True)
class Manifest:
    config: Layer
    layers: tuple[Layer, ...]
    schema_version: int = 2
    media_type: str = MANIFEST_V2

    def to_bytes(self) -> bytes:
        return go_json(
            {
                "schemaVersion": self.schema_version,
                "mediaType": self.media_type,
                "config": self.config.to_json(),
                "layers": [layer.to_json() for layer in self.layers],
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "manifest") -> Manifest:
        try:
            obj = json.loads(data)
            return cls(
                Layer.from_json(obj["config"]),
                tuple(Layer.from_json(x) for x in obj.get("layers") or []),
                int(obj.get("schemaVersion", 2)),
                str(obj.get("mediaType", MANIFEST_V2)),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise HerdError(f"{where}: malformed manifest: {e}") from e

    def all_layers(self) -> tuple[Layer, ...]:
        return (*self.layers, self.config)

    @property
    def size(self) -> int:
        """Sum of layer and config sizes, as Ollama's list reports it."""
        return sum(layer.size for layer in self.all_layers())

    def first(self, *media_types: str) -> Layer | None:
        return next((x for x in self.layers if x.media_type in media_types), None)


@dataclass
class ConfigV2:
    """The manifest's config blob (Ollama's `types/model.ConfigV2`, fields herd fills)."""

    model_format: str = "gguf"
    model_family: str = ""
    model_families: list[str] = field(default_factory=list)
    model_type: str = ""  # parameter size, e.g. "134.52M"
    file_type: str = ""  # quantization, e.g. "Q4_1"
    renderer: str = ""
    parser: str = ""
    requires: str = ""  # minimum Ollama version (semver without "v")
    diff_ids: list[str] = field(default_factory=list)
    draft: dict[str, str] | None = None  # Ollama's Draft: model_format, architecture

    def to_bytes(self) -> bytes:
        obj: dict[str, Any] = {
            "model_format": self.model_format,
            "model_family": self.model_family,
            "model_families": self.model_families,
            "model_type": self.model_type,
            "file_type": self.file_type,
        }
        for key in ("renderer", "parser", "requires"):  # omitempty in Go
            if getattr(self, key):
                obj[key] = getattr(self, key)
        if self.draft:  # `draft,omitempty`, after the fields above in Go's declaration order
            obj["draft"] = self.draft
        obj.update(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": self.diff_ids},
            }
        )
        return go_json(obj)


def fsync_dir(path: Path) -> None:
    """Make a rename durable; best effort where directories can't be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """Write `path` through a temp file in the same directory, fsync, then rename.

    On any exception (KeyboardInterrupt included) the temp file is removed and `path`
    keeps its old content, so readers never see a half-written file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


class BlobWriter:
    """Stream bytes into a temp file in the blobs dir while hashing them.

    `commit()` checks the digest (when one is expected) *before* renaming the file to
    `sha256-<hex>`; `discard()` (or leaving the `with` block by an exception) removes it.
    """

    def __init__(self, blobs_dir: Path, expected: str | None = None) -> None:
        self.blobs_dir = blobs_dir
        self.expected = parse_digest(expected) if expected else None
        blobs_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=blobs_dir)
        self.tmp = Path(tmp)
        self._file: IO[bytes] | None = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:  # a memoryview of bytes ("B")
        assert self._file is not None, "write after commit/discard"
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def commit(self) -> Layer:
        """Verify, fsync and rename into place; returns a Layer with an empty media type."""
        assert self._file is not None, "commit twice"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        hexdigest = self._hash.hexdigest()
        if self.expected is not None and hexdigest != self.expected:
            self.discard()
            raise DownloadError(
                f"digest mismatch: expected sha256:{self.expected}, got sha256:{hexdigest}"
            )
        os.replace(self.tmp, self.blobs_dir / f"sha256-{hexdigest}")
        fsync_dir(self.blobs_dir)
        return Layer("", f"sha256:{hexdigest}", self.size)

    def discard(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):  # a full disk fails the flush: remove it anyway
                file.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        # an un-committed writer, normal exit or not, leaves nothing behind
        self.discard()
