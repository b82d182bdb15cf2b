"""Pull from an OCI registry with Ollama's protocol (`server/download.go`,
`server/images.go`): the manifest, then each blob downloaded in resumable parts.

Pull: manifest GET; per blob a HEAD for its size, parts of size/16 clamped to
[100 MB, 1000 MB] downloaded in parallel with `Range` into `sha256-<hex>-partial` (sparse,
preallocated) while each part's progress is kept in `sha256-<hex>-partial-N` (Ollama's
JSON), so an interrupted pull resumes where it stopped, even one Ollama started. Unlike
Ollama, the sha256 is checked *before* the partial file is renamed into place: a blob with
the wrong bytes never enters the store. The manifest is written last.

A registry that misbehaves gets bounded patience (numbers in `client.Options`): sizes over
`max_blob`, over the manifest's or over the free disk space are refused before a file is
made; a 416 restarts the blob from 0 once, then fails; bytes with the wrong sha256 are
downloaded again `digest_retries` times, then refused; cut, stalled or dripping bodies and
5xx answers are retried `max_retries` times per part with backoff. A full disk removes what
this pull wrote and says so.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from herd import envconfig
from herd.errors import DownloadError, HerdError, RegistryError
from herd.registry.client import MANIFEST_V2, MAX_MANIFEST, Client, Options
from herd.registry.parts import (
    Fetch,
    RangeRefused,
    plan_parts,
    read_parts,
    remove_partial,
    state_path,
    write_part,
)
from herd.store.layout import Layer, Manifest, fsync_dir, parse_digest
from herd.store.names import Name
from herd.store.store import ModelRef, Store, is_disk_full, to_name

Progress = Callable[[str, str | None, int | None, int | None], None]
_CHUNK = 1 << 20
_write_part = write_part  # the name tests patch to fill the disk


def _quiet(status: str, digest: str | None, total: int | None, completed: int | None) -> None:
    pass


# ---------------------------------------------------------------- pull


def pull(
    store: Store, name: str | Name, options: Options | None = None, progress: Progress | None = None
) -> ModelRef:
    """Pull `name` from its registry into `store`; returns the stored model."""
    report = progress or _quiet
    n = to_name(name)
    added: list[str] = []  # blobs this pull brought in: a full disk takes them out again
    shown = n.display_shortest()
    with (
        store.disk_full_guard(f"pulling {shown}", DownloadError, lambda: store.prune(added)),
        Client(n, options) as client,
    ):
        report("pulling manifest", None, None, None)
        resp = client.request(
            "GET",
            client.url("manifests", n.tag),
            headers={"Accept": MANIFEST_V2, "Accept-Encoding": "identity"},
            what="manifest",
            attempts=client.options.max_retries,
        )
        data = client.read_limited(resp, MAX_MANIFEST, "a manifest")
        where = f"manifest of {shown} from {n.host}"
        manifest = _checked_manifest(data, where, client.options)
        try:
            old = store.read_manifest(n)[0]
        except HerdError:
            old = None
        blobs = list(dict.fromkeys([*manifest.layers, manifest.config]))
        missing = [x for x in blobs if not store.has_blob(x.digest)]
        store.check_space(
            sum(x.size - _resumed(store, x) for x in missing), f"pulling {shown}", DownloadError
        )
        for layer in blobs:
            if not download_blob(client, store, layer, report):
                added.append(layer.digest)
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


def _checked_manifest(data: bytes, where: str, options: Options) -> Manifest:
    manifest = Manifest.from_bytes(data, where)  # digests validated: no path tricks
    for layer in manifest.all_layers():
        if layer.size < 0:
            raise RegistryError(f"{where}: layer {layer.digest} has a negative size")
        if layer.size > options.max_blob:
            raise RegistryError(
                f"{where}: layer {layer.digest} claims {layer.size} bytes, more than "
                f"herd accepts for one blob ({options.max_blob})"
            )
    return manifest


def _partial(store: Store, digest: str) -> Path:
    return store.blobs_dir / f"sha256-{parse_digest(digest)}-partial"


def _resumed(store: Store, layer: Layer) -> int:
    """Bytes of `layer` an earlier pull left in its partial file (they need no new space)."""
    parts = read_parts(_partial(store, layer.digest), layer.size or None)
    return sum(p.completed for p in parts) if parts else 0


def download_blob(client: Client, store: Store, layer: Layer, report: Progress) -> bool:
    """Bring one blob into the store; True when it was already there (not re-verified)."""
    partial = _partial(store, layer.digest)
    try:
        return _download_blob(client, store, layer, partial, report)
    except OSError as e:
        # the disk can fill anywhere: part files, preallocation, the flush on close
        if not is_disk_full(e):
            raise
        remove_partial(partial)  # what it holds is the space that ran out
        raise DownloadError(
            f"no space left on device (disk full) while pulling blob {layer.digest} into "
            f"{store.blobs_dir}; free some space and pull again"
        ) from e


def _download_blob(
    client: Client, store: Store, layer: Layer, partial: Path, report: Progress
) -> bool:
    digest = layer.digest
    hexdigest = parse_digest(digest)
    final = store.blob_path(digest)
    if final.is_file():
        size = final.stat().st_size
        report(f"pulling {hexdigest[:12]}", digest, size, size)
        return True
    store.blobs_dir.mkdir(parents=True, exist_ok=True)
    what = f"blob {digest} ({layer.media_type or 'config'})"
    restarted, downloads = False, 0
    while True:
        try:
            _fill(client, store, layer, partial, report, what)
        except RangeRefused as e:
            remove_partial(partial)
            if restarted:
                raise RegistryError(
                    f"registry {client.host} refused a byte range of {what} again after "
                    f"the download restarted from 0 ({e}); its copy does not match the manifest"
                ) from None
            restarted = True  # a stale partial file or a changed blob: start over, once
            continue
        downloads += 1
        got = _sha256(partial)
        if got == hexdigest:
            break
        remove_partial(partial)
        if downloads > client.options.digest_retries:
            raise DownloadError(
                f"digest mismatch for {what}: got sha256:{got} in {downloads} download(s) "
                f"from {client.host}; nothing was kept, pull again later"
            )
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, final)
    fsync_dir(store.blobs_dir)
    remove_partial(partial)  # the part states
    return False


def _fill(
    client: Client,
    store: Store,
    layer: Layer,
    partial: Path,
    report: Progress,
    what: str,
) -> None:
    """Download every missing byte of `layer` into `partial` (resuming saved parts). No
    file is made before the sizes are checked and the registry served a first byte; a
    failure before any byte arrived leaves no file at all."""
    status = f"pulling {parse_digest(layer.digest)[:12]}"
    blob_url = client.url("blobs", layer.digest)
    parts = read_parts(partial, layer.size or None) if partial.is_file() else None
    if parts is None:
        remove_partial(partial)
        total = _remote_size(client, blob_url, layer, what)
        store.check_space(total, f"pulling {what}", DownloadError)
        parts = plan_parts(total, client.options)
    total = sum(p.size for p in parts)
    todo = [p for p in parts if p.completed < p.size]
    direct, direct_auth = _direct_url(client, blob_url, what) if todo else (blob_url, True)
    for part in parts:
        _write_part(state_path(partial, part), part)
    with open(partial, "a+b") as f:
        f.truncate(total)  # sparse preallocation, as Ollama does (size checked above)
    done = [sum(p.completed for p in parts)]
    lock = threading.Lock()
    report(status, layer.digest, total, done[0])

    def on_bytes(n: int) -> None:
        with lock:
            done[0] += n
            report(status, layer.digest, total, done[0])

    if not todo:
        return
    with open(partial, "r+b") as f:
        fetch = Fetch(client, direct, direct_auth, f, partial, on_bytes, what)
        try:
            fetch.run(todo)
        except BaseException:
            if not any(p.completed for p in parts):
                fetch.discard()  # nothing to resume: keep no empty partial file
                remove_partial(partial)
            raise


def _remote_size(client: Client, url: httpx.URL, layer: Layer, what: str) -> int:
    """The blob's size by HEAD, checked against the manifest and `max_blob`."""
    resp = client.request("HEAD", url, what=what, attempts=client.options.max_retries)
    resp.close()
    declared = resp.headers.get("content-length", "")
    if not declared.isdigit():
        raise RegistryError(f"registry {client.host} sent no size for {what}")
    total = int(declared)
    if layer.size and total != layer.size:
        raise DownloadError(f"{what}: registry says {total} bytes, manifest says {layer.size}")
    if total > client.options.max_blob:
        raise RegistryError(
            f"registry {client.host} says {what} is {total} bytes, more than herd accepts "
            f"for one blob ({client.options.max_blob})"
        )
    return total


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _direct_url(client: Client, url: httpx.URL, what: str) -> tuple[httpx.URL, bool]:
    """Where the bytes are: the blob URL, or the other host it redirects to (a CDN).

    Redirects within the registry are followed; the first one to another host is where the
    parts are fetched from, without the registry's token (as Ollama does)."""
    try:
        resp = client.request(
            "GET",
            url,
            headers={"Range": "bytes=0-0"},
            what=what,
            cross_host=True,
            attempts=client.options.max_retries,
        )
    except RegistryError as e:
        if e.status == 416:
            raise RangeRefused(str(e), 416) from None
        raise
    resp.close()
    if resp.is_redirect:
        target = resp.url.join(resp.headers["location"])
        if target.scheme != "https" and not client.options.insecure:
            raise RegistryError(
                f"{what}: redirected to plain http ({target.host}); pass --insecure to allow it"
            )
        return target, False
    return resp.url, True


def registry_puller(options: Options | None = None) -> Callable[[Store, Name, Progress], ModelRef]:
    """A `herd.store.pull` hook that pulls names outside the catalog from their registry."""

    def puller(store: Store, name: Name, progress: Progress) -> ModelRef:
        # herd.store.pull already reported "pulling manifest" and will report "success"
        steps = {"pulling manifest", "success"}
        return pull(
            store, name, options, lambda s, d, t, c: None if s in steps else progress(s, d, t, c)
        )

    return puller
