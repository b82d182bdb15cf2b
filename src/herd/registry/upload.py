"""Push to an OCI registry with Ollama's protocol (`server/upload.go`,
`server/images.go`).

Push: per blob HEAD, else POST an upload (with a cross-repository mount when the layer
says where it came `from`), PATCH the parts, PUT `?digest=`; then PUT the manifest bytes
exactly as they are in the store, so the pulled copy has the same digest.
"""

from __future__ import annotations

import contextlib
import hashlib

import httpx

from herd.errors import HerdError, InvalidNameError, RegistryError
from herd.registry.client import MANIFEST_V2, Client, Options, file_slices
from herd.registry.download import Progress, _quiet
from herd.store import names
from herd.store.layout import Layer, parse_digest
from herd.store.names import Name
from herd.store.store import Store, to_name


def push(
    store: Store, name: str | Name, options: Options | None = None, progress: Progress | None = None
) -> None:
    """Push model `name` from `store` to its registry."""
    report = progress or _quiet
    n = store.existing(to_name(name))
    report("retrieving manifest", None, None, None)
    manifest, data = store.read_manifest(n, n.display_shortest())
    blobs = list(dict.fromkeys([*manifest.layers, manifest.config]))
    for layer in blobs:
        if not store.has_blob(layer.digest):
            raise HerdError(
                f"model '{n.display_shortest()}' is incomplete: blob "
                f"{layer.digest} is missing locally"
            )
    with Client(n, options) as client:
        for layer in blobs:
            upload_blob(client, store, layer, report)
        report("pushing manifest", None, None, None)
        client.request(
            "PUT",
            client.url("manifests", n.tag),
            headers={"Content-Type": MANIFEST_V2},
            body=data,
            what="manifest",
        ).close()
    report("success", None, None, None)


def _location(resp: httpx.Response, client: Client) -> httpx.URL:
    loc = resp.headers.get("docker-upload-location") or resp.headers.get("location")
    if not loc:
        raise RegistryError(
            f"registry {client.host} gave no upload location (status {resp.status_code})"
        )
    return resp.url.join(loc)


def upload_blob(client: Client, store: Store, layer: Layer, report: Progress) -> None:
    digest = layer.digest
    status = f"pushing {parse_digest(digest)[:12]}"
    path = store.blob_path(digest)
    total = path.stat().st_size
    try:
        client.request(
            "HEAD",
            client.url("blobs", digest),
            what=f"blob {digest}",
            attempts=client.options.max_retries,
        ).close()
        report(status, digest, total, total)
        return
    except RegistryError as e:
        if e.status != 404:
            raise
    start = client.url("blobs", "uploads", "")
    if layer.from_:
        with contextlib.suppress(InvalidNameError):
            src = names.parse(layer.from_)
            if src.host.lower() == client.name.host.lower():
                start = start.copy_merge_params(
                    {"mount": digest, "from": f"{src.namespace}/{src.model}"}
                )
    resp = client.request("POST", start, what="upload")
    resp.close()
    if resp.status_code == 201:  # mounted from the other repository
        report(status, digest, total, total)
        return
    location = _location(resp, client)
    size = min(max(total // client.options.parts, client.options.part_min), client.options.part_max)
    done = [0]

    def on_bytes(k: int) -> None:
        done[0] += k
        report(status, digest, total, done[0])

    md5s = []
    offset = 0
    while offset < total:
        n = min(size, total - offset)
        body = file_slices(str(path), offset, n, on_bytes=on_bytes)
        md5 = hashlib.md5()
        for chunk in file_slices(str(path), offset, n)():
            md5.update(chunk)
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(n),
            "Content-Range": f"{offset}-{offset + n - 1}",
            "X-Redirect-Uploads": "1",
        }
        before = done[0]
        resp = client.request(
            "PATCH", location, headers=headers, body=body, what="upload", cross_host=True
        )
        resp.close()
        if resp.status_code == 307:  # upload this part straight to storage
            done[0] = before
            direct = resp.url.join(resp.headers["location"])
            put = client.http.send(
                client.http.build_request(
                    "PUT",
                    direct,
                    content=body(),
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(n)},
                ),
                stream=True,  # its body is not needed: never read one without bound
            )
            put.close()
            if put.status_code >= 400:
                raise RegistryError(
                    f"uploading part to {direct.host} failed: {put.status_code}", put.status_code
                )
        location = _location(resp, client)
        md5s.append(md5.digest())
        offset += n
    etag = f"{hashlib.md5(b''.join(md5s)).hexdigest()}-{len(md5s)}"
    final = location.copy_merge_params({"digest": digest, "etag": etag})
    client.request(
        "PUT",
        final,
        headers={"Content-Type": "application/octet-stream", "Content-Length": "0"},
        body=b"",
        what="upload",
    ).close()
    report(status, digest, total, total)
