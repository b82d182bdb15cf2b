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
from pathlib import Path
from typing import IO, Any

from herd.errors import DownloadError, HerdError

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_ADAPTER = "application/vnd.ollama.image.adapter"
MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"
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
    keeps struct fields in declaration order.
    """
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return (text + "\n").encode()


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int
    from_: str = ""  # Ollama's `from`: the source model/path of a layer (optional)
    name: str = ""  # tensor layers only

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
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
            return cls(str(obj["mediaType"]), digest, int(obj["size"]),
                       str(obj.get("from", "")), str(obj.get("name", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise HerdError(f"malformed manifest layer: {obj!r}") from e


@dataclass(frozen=True)
class Manifest:
    config: Layer
    layers: tuple[Layer, ...]
    schema_version: int = 2
    media_type: str = MANIFEST_V2

    def to_bytes(self) -> bytes:
        return go_json({
            "schemaVersion": self.schema_version,
            "mediaType": self.media_type,
            "config": self.config.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        })

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "manifest") -> Manifest:
        try:
            obj = json.loads(data)
            return cls(Layer.from_json(obj["config"]),
                       tuple(Layer.from_json(x) for x in obj.get("layers") or []),
                       int(obj.get("schemaVersion", 2)), str(obj.get("mediaType", MANIFEST_V2)))
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
    diff_ids: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return go_json({
            "model_format": self.model_format,
            "model_family": self.model_family,
            "model_families": self.model_families,
            "model_type": self.model_type,
            "file_type": self.file_type,
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": self.diff_ids},
        })


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

    def write(self, data: bytes) -> None:
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
            raise DownloadError(f"digest mismatch: expected sha256:{self.expected}, "
                                f"got sha256:{hexdigest}")
        os.replace(self.tmp, self.blobs_dir / f"sha256-{hexdigest}")
        fsync_dir(self.blobs_dir)
        return Layer("", f"sha256:{hexdigest}", self.size)

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        # an un-committed writer, normal exit or not, leaves nothing behind
        self.discard()
