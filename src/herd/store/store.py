"""The model store: Ollama's layout under one root (`manifests/`, `blobs/`).

Any directory Ollama wrote (`~/.ollama/models`) is a valid herd store and the reverse.
Blobs are content-addressed and written atomically; a manifest is written last, so a
model either resolves completely or is not in the store at all.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from herd import envconfig
from herd.errors import HerdError, InvalidNameError, ModelNotFoundError
from herd.store import names
from herd.store.layout import (
    CONFIG_V1,
    MEDIA_ADAPTER,
    MEDIA_DRAFT,
    MEDIA_LICENSE,
    MEDIA_MESSAGES,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_PROJECTOR,
    MEDIA_PROMPT,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    TEMP_PREFIX,
    BlobWriter,
    ConfigV2,
    Layer,
    Manifest,
    atomic_file,
    blob_filename,
    go_json,
)
from herd.store.names import Name

if TYPE_CHECKING:
    from herd.store.ggufinfo import GGUFFacts


@dataclass(frozen=True)
class ModelRef:
    """Everything needed to load a stored model."""

    name: str  # shortest display form, e.g. "smollm2:135m"
    model_path: Path  # the GGUF blob
    template: str | None  # template layer text (Go template or Jinja); None: use the GGUF's
    system: str | None
    params: dict[str, Any]
    license: list[str]
    digest: str  # hex sha256 of the manifest bytes (Ollama's model digest / ID)
    config: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    projector: Path | None = None  # the projector layer's blob (llama.cpp's mmproj layout)
    adapters: list[Path] = field(default_factory=list)  # the adapter layers' blobs (LoRA)
    draft: Path | None = None  # the draft layer's blob (Modelfile DRAFT: speculative decoding)


@dataclass(frozen=True)
class ModelEntry:
    """One row of `list()` (Ollama's ListModelResponse essentials)."""

    name: str
    digest: str  # hex sha256 of the manifest bytes
    size: int  # bytes of all layers and the config
    modified: datetime
    details: dict[str, Any] = field(default_factory=dict)  # the config blob


def to_name(name: str | Name) -> Name:
    return names.parse(name) if isinstance(name, str) else name


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


class Store:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else envconfig.models_dir()
        self.manifests_dir = self.root / "manifests"
        self.blobs_dir = self.root / "blobs"

    # ---- blobs
    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / blob_filename(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def blob_writer(self, expected: str | None = None) -> BlobWriter:
        return BlobWriter(self.blobs_dir, expected)

    def write_blob(self, data: bytes, media_type: str) -> Layer:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.has_blob(digest):
            with self.blob_writer(digest) as w:
                w.write(data)
                w.commit()
        return Layer(media_type, digest, len(data))

    def remove_stale_temp(self, max_age_s: float = 3600.0) -> None:
        """Delete temp files a killed process left (old enough not to be in use)."""
        now = time.time()
        for d in (self.blobs_dir, *self.manifests_dir.rglob("*")):
            if not d.is_dir():
                continue
            for p in d.glob(TEMP_PREFIX + "*"):
                with contextlib.suppress(OSError):
                    if now - p.stat().st_mtime > max_age_s:
                        p.unlink()

    # ---- a full disk
    def free_space(self) -> int:
        """Bytes free on the store's disk (of its nearest existing folder)."""
        d = self.root
        while not d.exists() and d != d.parent:
            d = d.parent
        return shutil.disk_usage(d).free

    def check_space(self, need: int, doing: str, error: type[HerdError] = HerdError) -> None:
        """Refuse `doing` before writing anything when it needs more bytes than are free."""
        free = self.free_space()
        if need > free:
            raise error(
                f"no space left on device (disk full): {doing} needs {need} bytes, "
                f"{free} are free in {self.root}; free some space and try again"
            )

    @contextlib.contextmanager
    def disk_full_guard(
        self,
        doing: str,
        error: type[HerdError] = HerdError,
        undo: Callable[[], None] | None = None,
    ) -> Iterator[None]:
        """Turn ENOSPC (or a full quota) anywhere in the block into `error` naming the
        store, after `undo()` removed what the block had written."""
        try:
            yield
        except OSError as e:
            if not is_disk_full(e):
                raise
            if undo is not None:
                with contextlib.suppress(Exception):
                    undo()
            where = e.filename or self.root  # the store, or a temp folder elsewhere
            raise error(
                f"no space left on device (disk full) while {doing} ({where}); "
                "nothing was kept: free some space and try again"
            ) from e

    def blob_files(self) -> set[str]:
        """The names of the files in blobs/ now (to undo what an operation added)."""
        return {p.name for p in self.blobs_dir.iterdir()} if self.blobs_dir.is_dir() else set()

    def remove_new_blobs(self, before: set[str]) -> None:
        """Delete the blobs added since `before` that no manifest references."""
        added = self.blob_files() - before
        self.prune(
            f"sha256:{x.removeprefix('sha256-')}"
            for x in added
            if x.startswith("sha256-") and len(x) == 71
        )

    # ---- manifests
    def manifest_path(self, name: Name) -> Path:
        path = self.manifests_dir / name.filepath()
        # names.validate already forbids '..' and '/', this guards against future edits
        if os.path.commonpath([path.resolve(), self.manifests_dir.resolve()]) != str(
            self.manifests_dir.resolve()
        ):
            raise InvalidNameError(f"invalid model name '{name}': escapes the store")
        return path

    def names(self) -> list[Name]:
        if not self.manifests_dir.is_dir():
            return []
        found = []
        for path in self.manifests_dir.glob("*/*/*/*"):
            if path.is_file():
                n = names.from_filepath(path.relative_to(self.manifests_dir).as_posix())
                if n is not None:
                    found.append(n)
        return sorted(found, key=str)

    def existing(self, name: str | Name) -> Name:
        """`name` as spelled in the store, matched case-insensitively (itself if absent)."""
        return names.match_existing(to_name(name), self.names())

    def read_manifest(self, name: str | Name, shown: str | None = None) -> tuple[Manifest, bytes]:
        """The manifest and its bytes; ModelNotFoundError names `shown` (default: `name`)."""
        n = self.existing(name)
        path = self.manifest_path(n)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ModelNotFoundError(f"model '{shown or _shown(name)}' not found") from None
        return Manifest.from_bytes(data, str(path)), data

    def write_manifest(self, name: str | Name, manifest: Manifest | bytes) -> str:
        """Write atomically; returns the manifest digest (hex)."""
        data = manifest if isinstance(manifest, bytes) else manifest.to_bytes()
        with atomic_file(self.manifest_path(self.existing(name))) as f:
            f.write(data)
        return hashlib.sha256(data).hexdigest()

    def write_model(
        self,
        name: str | Name,
        model: Layer,
        *,
        template: str | None = None,
        system: str | None = None,
        params: dict[str, Any] | None = None,
        license: list[str] | None = None,
        facts: GGUFFacts | None = None,
    ) -> ModelRef:
        """Write the small layers, the config blob and, last, the manifest of a GGUF model.

        `model` must already be a blob in the store (its media type is set here).
        """
        if facts is None:
            # imported here: the GGUF reader pulls in NumPy and gguf (~100 ms), which
            # commands like `herd list` never need
            from herd.gguf import open_gguf
            from herd.store.ggufinfo import describe

            facts = describe(open_gguf(self.blob_path(model.digest)))
        layers = [Layer(MEDIA_MODEL, model.digest, model.size, model.from_)]
        if template is not None:
            layers.append(self.write_blob(template.encode(), MEDIA_TEMPLATE))
        if system is not None:
            layers.append(self.write_blob(system.encode(), MEDIA_SYSTEM))
        if params:
            layers.append(self.write_blob(go_json(params, sort_keys=True), MEDIA_PARAMS))
        for text in license or []:
            layers.append(self.write_blob(text.encode(), MEDIA_LICENSE))
        config = ConfigV2(
            model_family=facts.architecture,
            model_families=[facts.architecture],
            model_type=facts.parameter_size,
            file_type=facts.file_type,
            diff_ids=[x.digest for x in layers],
        )
        config_layer = self.write_blob(config.to_bytes(), CONFIG_V1)
        self.write_manifest(name, Manifest(config_layer, tuple(layers)))
        return self.resolve(name)

    # ---- user operations
    def list(self) -> list[ModelEntry]:
        """Every model, newest first."""
        out = []
        for n in self.names():
            path = self.manifest_path(n)
            try:
                data = path.read_bytes()
                manifest = Manifest.from_bytes(data, str(path))
                modified = datetime.fromtimestamp(path.stat().st_mtime).astimezone()
            except (OSError, HerdError):
                continue  # a broken manifest must not hide the others
            out.append(
                ModelEntry(
                    n.display_shortest(),
                    hashlib.sha256(data).hexdigest(),
                    manifest.size,
                    modified,
                    self._config(manifest),
                )
            )
        return sorted(out, key=lambda e: e.modified, reverse=True)

    def resolve(self, name: str | Name) -> ModelRef:
        """The stored model `name`; ModelNotFoundError when there is none."""
        n = self.existing(name)
        manifest, data = self.read_manifest(n, _shown(name))
        model = manifest.first(MEDIA_MODEL)
        if model is None:
            raise HerdError(f"model '{_shown(name)}' has no GGUF model layer")
        model_path = self.blob_path(model.digest)
        if not model_path.is_file():
            raise HerdError(
                f"model '{_shown(name)}' is incomplete: blob {model.digest} is "
                "missing; pull it again"
            )
        projector, projector_path = manifest.first(MEDIA_PROJECTOR), None
        if projector is not None:
            projector_path = self.blob_path(projector.digest)
            if not projector_path.is_file():
                raise HerdError(
                    f"model '{_shown(name)}' is incomplete: projector blob "
                    f"{projector.digest} is missing; pull it again"
                )
        template = self._text(manifest.first(MEDIA_TEMPLATE, MEDIA_PROMPT))
        params = self._json(manifest.first(MEDIA_PARAMS)) or {}
        messages = self._json(manifest.first(MEDIA_MESSAGES)) or []
        return ModelRef(
            name=n.display_shortest(),
            model_path=model_path,
            template=template,
            system=self._text(manifest.first(MEDIA_SYSTEM)),
            params=params if isinstance(params, dict) else {},
            license=[self._text(x) or "" for x in manifest.layers if x.media_type == MEDIA_LICENSE],
            digest=hashlib.sha256(data).hexdigest(),
            config=self._config(manifest),
            messages=messages if isinstance(messages, list) else [],
            projector=projector_path,
            adapters=[
                self.blob_path(x.digest) for x in manifest.layers if x.media_type == MEDIA_ADAPTER
            ],
            draft=self._layer_blob(manifest.first(MEDIA_DRAFT), _shown(name)),
        )

    def delete(self, name: str | Name) -> None:
        """Remove the manifest, then every blob no other manifest references."""
        n = self.existing(name)
        manifest, _ = self.read_manifest(n, _shown(name))
        path = self.manifest_path(n)
        path.unlink()
        self._remove_empty_dirs(path.parent)
        in_use = self._referenced()
        for layer in manifest.all_layers():
            if layer.digest not in in_use:
                with contextlib.suppress(FileNotFoundError):
                    self.blob_path(layer.digest).unlink()

    def prune(self, digests: Iterable[str]) -> None:
        """Delete those of `digests` that no manifest references any more."""
        in_use = self._referenced()
        for digest in set(digests) - in_use:
            with contextlib.suppress(FileNotFoundError, HerdError):
                self.blob_path(digest).unlink()

    def copy(self, src: str | Name, dst: str | Name) -> None:
        """Copy the manifest bytes: both names share blobs and the same digest."""
        _, data = self.read_manifest(src)
        self.write_manifest(dst, data)

    # ---- helpers
    def _referenced(self) -> set[str]:
        used: set[str] = set()
        for n in self.names():
            with contextlib.suppress(OSError, HerdError):
                m = Manifest.from_bytes(self.manifest_path(n).read_bytes())
                used.update(x.digest for x in m.all_layers())
        return used

    def _remove_empty_dirs(self, d: Path) -> None:
        while d != self.manifests_dir and d.is_relative_to(self.manifests_dir):
            try:
                d.rmdir()
            except OSError:
                return  # not empty
            d = d.parent

    def _layer_blob(self, layer: Layer | None, shown: str) -> Path | None:
        """A GGUF layer's blob, which must be there (a model that resolves loads whole)."""
        if layer is None:
            return None
        path = self.blob_path(layer.digest)
        if not path.is_file():
            raise HerdError(
                f"model '{shown}' is incomplete: blob {layer.digest} ({layer.media_type}) is "
                "missing; pull it again"
            )
        return path

    def _text(self, layer: Layer | None) -> str | None:
        if layer is None:
            return None
        try:
            return self.blob_path(layer.digest).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise HerdError(f"blob {layer.digest} ({layer.media_type}) is missing") from None

    def _json(self, layer: Layer | None) -> Any:
        text = self._text(layer)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError as e:
            raise HerdError(f"blob {layer.digest if layer else ''} is not valid JSON: {e}") from e

    def _config(self, manifest: Manifest) -> dict[str, Any]:
        try:
            value = json.loads(self.blob_path(manifest.config.digest).read_bytes())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}


def _shown(name: str | Name) -> str:
    return name if isinstance(name, str) else name.display_shortest()
