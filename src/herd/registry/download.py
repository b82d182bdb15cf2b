"""Pull from an OCI registry with Ollama's protocol (`server/download.go`,
`server/images.go`): the manifest, then each blob downloaded in resumable parts.

Pull: manifest GET; per blob a HEAD for its size, parts of size/16 clamped to
[100 MB, 1000 MB] downloaded in parallel with `Range` into `sha256-<hex>-partial` (sparse,
preallocated) while each part's progress is kept in `sha256-<hex>-partial-N` (Ollama's
JSON), so an interrupted pull resumes where it stopped, even one Ollama started. Unlike
Ollama, the sha256 is checked *before* the partial file is renamed into place: a blob with
the wrong bytes never enters the store. The manifest is written last.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from herd import envconfig
from herd.errors import DownloadError, HerdError, RegistryError
from herd.registry.client import MANIFEST_V2, Client, Options
from herd.store.layout import Layer, Manifest, fsync_dir, parse_digest
from herd.store.names import Name
from herd.store.store import ModelRef, Store, to_name

Progress = Callable[[str, str | None, int | None, int | None], None]
_CHUNK = 1 << 20
_SAVE_EVERY = 8 << 20  # persist part state at least this often (bytes)


def _quiet(status: str, digest: str | None, total: int | None, completed: int | None) -> None:
    pass


# ---------------------------------------------------------------- pull


def pull(
    store: Store, name: str | Name, options: Options | None = None, progress: Progress | None = None
) -> ModelRef:
    """Pull `name` from its registry into `store`; returns the stored model."""
    report = progress or _quiet
    n = to_name(name)
    with Client(n, options) as client:
        report("pulling manifest", None, None, None)
        resp = client.request(
            "GET", client.url("manifests", n.tag), headers={"Accept": MANIFEST_V2}, what="manifest"
        )
        data = resp.content
        where = f"manifest of {n.display_shortest()} from {n.host}"
        manifest = _checked_manifest(data, where)
        try:
            old = store.read_manifest(n)[0]
        except HerdError:
            old = None
        blobs = list(dict.fromkeys([*manifest.layers, manifest.config]))
        for layer in blobs:
            download_blob(client, store, layer, report)
        report("verifying sha256 digest", None, None, None)  # done per blob, before commit
        report("writing manifest", None, None, None)
        store.write_manifest(n, data)
    if old is not None and not envconfig.noprune():
        stale = {x.digest for x in old.all_layers()} - {x.digest for x in blobs}
        if stale:
            report("removing unused layers", None, None, None)
            store.prune(stale)
    report("success", None, None, None)
    return store.resolve(n)


def _checked_manifest(data: bytes, where: str) -> Manifest:
    manifest = Manifest.from_bytes(data, where)  # digests validated: no path tricks
    for layer in manifest.all_layers():
        if layer.size < 0:
            raise RegistryError(f"{where}: layer {layer.digest} has a negative size")
    return manifest


@dataclass
class _Part:
    n: int
    offset: int
    size: int
    completed: int = 0

    def to_json(self) -> bytes:
        # Ollama's jsonBlobDownloadPart, as json.Encoder writes it
        return (
            json.dumps(
                {
                    "N": self.n,
                    "Offset": self.offset,
                    "Size": self.size,
                    "Completed": self.completed,
                },
                separators=(",", ":"),
            ).encode()
            + b"\n"
        )


def _write_part(path: Path, part: _Part) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(part.to_json())
    os.replace(tmp, path)


def _read_parts(partial: Path) -> list[_Part] | None:
    """Saved part states, or None when absent or not a consistent set (then start over)."""
    files = sorted(
        partial.parent.glob(partial.name + "-*"), key=lambda p: p.name.rsplit("-", 1)[-1].zfill(8)
    )
    files = [p for p in files if p.name.rsplit("-", 1)[-1].isdigit()]
    if not files:
        return None
    parts = []
    try:
        for p in files:
            obj = json.loads(p.read_bytes())
            parts.append(
                _Part(int(obj["N"]), int(obj["Offset"]), int(obj["Size"]), int(obj["Completed"]))
            )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    parts.sort(key=lambda x: x.offset)
    offset = 0
    for i, part in enumerate(parts):
        if part.n != i or part.offset != offset or not 0 <= part.completed <= part.size:
            return None
        offset += part.size
    return parts


def _remove_partial(partial: Path) -> None:
    for p in partial.parent.glob(partial.name + "*"):
        with contextlib.suppress(OSError):
            p.unlink()


def download_blob(client: Client, store: Store, layer: Layer, report: Progress) -> bool:
    """Bring one blob into the store; True when it was already there (not re-verified)."""
    try:
        return _download_blob(client, store, layer, report)
    except OSError as e:
        # the disk can fill anywhere: part files, preallocation, the flush on close
        if e.errno != errno.ENOSPC:
            raise
        raise DownloadError(
            f"disk full while pulling blob {layer.digest} into "
            f"{store.blobs_dir}; free some space and pull again (it resumes)"
        ) from e


def _download_blob(client: Client, store: Store, layer: Layer, report: Progress) -> bool:
    digest = layer.digest
    hexdigest = parse_digest(digest)
    status = f"pulling {hexdigest[:12]}"
    final = store.blob_path(digest)
    if final.is_file():
        size = final.stat().st_size
        report(status, digest, size, size)
        return True
    store.blobs_dir.mkdir(parents=True, exist_ok=True)
    partial = store.blobs_dir / f"sha256-{hexdigest}-partial"
    blob_url = client.url("blobs", digest)
    what = f"blob {digest} ({layer.media_type or 'config'})"
    parts = _read_parts(partial) if partial.is_file() else None
    if parts is None:
        _remove_partial(partial)
        resp = client.request("HEAD", blob_url, what=what)
        resp.close()
        try:
            total = int(resp.headers.get("content-length", ""))
        except ValueError:
            raise RegistryError(f"registry {client.host} sent no size for {what}") from None
        if layer.size and total != layer.size:
            raise DownloadError(f"{what}: registry says {total} bytes, manifest says {layer.size}")
        parts = _plan_parts(total, client.options)
        for part in parts:
            _write_part(Path(f"{partial}-{part.n}"), part)
    total = sum(p.size for p in parts)
    done = [sum(p.completed for p in parts)]
    lock = threading.Lock()
    report(status, digest, total, done[0])

    with open(partial, "a+b") as f:
        f.truncate(total)  # sparse preallocation, as Ollama does
    direct, direct_auth = _direct_url(client, blob_url, what)

    def on_bytes(n: int) -> None:
        with lock:
            done[0] += n
            report(status, digest, total, done[0])

    todo = [p for p in parts if p.completed < p.size]
    errors: list[BaseException] = []
    if todo:
        with (
            open(partial, "r+b") as f,
            ThreadPoolExecutor(max_workers=min(len(todo), client.options.parts)) as pool,
        ):
            futures = [
                pool.submit(
                    _download_part,
                    client,
                    direct,
                    direct_auth,
                    f,
                    part,
                    Path(f"{partial}-{part.n}"),
                    on_bytes,
                    lock,
                    what,
                )
                for part in todo
            ]
            for fut in futures:
                with contextlib.suppress(BaseException):
                    fut.result()
                if fut.exception() is not None:
                    errors.append(fut.exception())  # type: ignore[arg-type]
    if errors:
        disk_full = next(
            (e for e in errors if isinstance(e, OSError) and e.errno == errno.ENOSPC), None
        )
        raise disk_full or errors[0]  # a full disk first: download_blob names it

    # every byte is here: check it before it may become a blob
    h = hashlib.sha256()
    with open(partial, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    if h.hexdigest() != hexdigest:
        _remove_partial(partial)
        raise DownloadError(
            f"digest mismatch for {what}: got sha256:{h.hexdigest()}; "
            "the download was discarded, pull again"
        )
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, final)
    fsync_dir(store.blobs_dir)
    for part in parts:
        with contextlib.suppress(OSError):
            Path(f"{partial}-{part.n}").unlink()
    return False


def _plan_parts(total: int, options: Options) -> list[_Part]:
    size = min(max(total // options.parts, options.part_min), options.part_max)
    size = max(size, 1)
    parts, offset = [], 0
    while offset < total:
        parts.append(_Part(len(parts), offset, min(size, total - offset)))
        offset += parts[-1].size
    return parts


def _direct_url(client: Client, url: httpx.URL, what: str) -> tuple[httpx.URL, bool]:
    """Where the bytes are: the blob URL, or the other host it redirects to (a CDN).

    Redirects within the registry are followed; the first one to another host is where the
    parts are fetched from, without the registry's token (as Ollama does)."""
    resp = client.request(
        "GET", url, headers={"Range": "bytes=0-0"}, stream=True, what=what, cross_host=True
    )
    resp.close()
    if resp.is_redirect:
        target = resp.url.join(resp.headers["location"])
        if target.scheme != "https" and not client.options.insecure:
            raise RegistryError(
                f"{what}: redirected to plain http ({target.host}); pass --insecure to allow it"
            )
        return target, False
    return resp.url, True


def _download_part(
    client: Client,
    url: httpx.URL,
    with_auth: bool,
    f: object,
    part: _Part,
    state: Path,
    on_bytes: Callable[[int], None],
    lock: threading.Lock,
    what: str,
) -> None:
    last: BaseException | None = None
    tries = 0
    while tries < client.options.max_retries:
        try:
            _fetch_range(client, url, with_auth, f, part, state, on_bytes, lock)
            return
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise
            last = e
        except (httpx.HTTPError, RegistryError, _Short) as e:
            last = e
            if isinstance(e, RegistryError) and e.status in (401, 403, 404):
                break  # asking again will not help
        finally:
            _write_part(state, part)
        tries += 1
        if tries < client.options.max_retries:
            time.sleep(client.options.backoff * 2 ** (tries - 1))
    raise DownloadError(
        f"{what}: part {part.n} failed after {tries} attempt(s): {last}; pull again to resume"
    ) from last


class _Short(Exception):
    """The server closed the body before the end of the range."""


def _fetch_range(
    client: Client,
    url: httpx.URL,
    with_auth: bool,
    f: object,
    part: _Part,
    state: Path,
    on_bytes: Callable[[int], None],
    lock: threading.Lock,
) -> None:
    start, stop = part.offset + part.completed, part.offset + part.size - 1
    headers = {"Range": f"bytes={start}-{stop}"}
    if with_auth:
        resp = client.request("GET", url, headers=headers, stream=True, what="blob part")
    else:
        resp = client.http.send(client.http.build_request("GET", url, headers=headers), stream=True)
        if resp.status_code >= 400:
            resp.close()
            raise RegistryError(
                f"{url.host} answered {resp.status_code} for a blob part", resp.status_code
            )
    try:
        if resp.status_code != 206 and not (
            resp.status_code == 200
            and start == 0
            and part.size == int(resp.headers.get("content-length", -1))
        ):
            raise RegistryError(
                f"{url.host} ignored the Range request (status {resp.status_code})",
                resp.status_code,
            )
        unsaved = 0
        for chunk in resp.iter_raw():  # as received: a cut connection loses nothing
            chunk = chunk[: part.size - part.completed]
            if not chunk:
                break
            with lock:
                f.seek(part.offset + part.completed)  # type: ignore[attr-defined]
                f.write(chunk)  # type: ignore[attr-defined]
            part.completed += len(chunk)
            unsaved += len(chunk)
            on_bytes(len(chunk))
            if unsaved >= _SAVE_EVERY:
                with lock:
                    f.flush()  # type: ignore[attr-defined]
                _write_part(state, part)
                unsaved = 0
        with lock:
            f.flush()  # type: ignore[attr-defined]
    finally:
        resp.close()
    if part.completed < part.size:
        raise _Short(f"connection closed after {part.completed} of {part.size} bytes")


def registry_puller(options: Options | None = None) -> Callable[[Store, Name, Progress], ModelRef]:
    """A `herd.store.pull` hook that pulls names outside the catalog from their registry."""

    def puller(store: Store, name: Name, progress: Progress) -> ModelRef:
        # herd.store.pull already reported "pulling manifest" and will report "success"
        steps = {"pulling manifest", "success"}
        return pull(
            store, name, options, lambda s, d, t, c: None if s in steps else progress(s, d, t, c)
        )

    return puller
