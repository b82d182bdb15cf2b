"""`create`: build a model in the store from a Modelfile, the way Ollama's create does.

Layers, in Ollama's order: the model (a GGUF copied in, a Hugging Face folder converted
to an F16 GGUF, quantized if asked, or the layers of an existing model), adapters, then
template, system, licenses, params and messages; then the config blob and, last, the
manifest. Every blob goes in through a temp file and a rename, so a failure leaves no
half-written blob and no manifest. A GGUF that already is a blob of the store (the server
stages uploaded files as links to their blobs) is used in place.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from herd.errors import GGUFError, HerdError, ModelfileError, ModelNotFoundError
from herd.gguf import GGUFFile, open_gguf
from herd.modelfile import Command, Modelfile, resolve_source
from herd.store import names, quantize
from herd.store.ggufinfo import describe
from herd.store.layout import (
    CONFIG_V1,
    MEDIA_ADAPTER,
    MEDIA_LICENSE,
    MEDIA_MESSAGES,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_PROJECTOR,
    MEDIA_PROMPT,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    ConfigV2,
    Layer,
    Manifest,
    go_json,
)
from herd.store.store import ModelRef, Store
from herd.store.wheels import Progress

# Pull a model that FROM names but the store lacks: (store, name, progress) -> ModelRef.
Puller = Callable[[Store, names.Name, Progress], ModelRef]

_COPY_CHUNK = 1 << 22
_BLOB_NAME = re.compile(r"sha256-[0-9a-f]{64}")
_HF_WEIGHTS = (".safetensors", ".bin", ".pth")


def create(
    store: Store,
    name: str,
    modelfile: Modelfile,
    *,
    base_dir: str | Path = ".",
    quantize_to: str | None = None,
    progress: Progress | None = None,
    pull: Puller | None = None,
) -> ModelRef:
    """Create (or replace) model `name` from `modelfile`; FROM paths are relative to
    `base_dir`. `progress(status, digest, total, completed)` gets Ollama's create steps."""
    target = store.existing(names.parse(name))
    before = set(store.blobs_dir.iterdir()) if store.blobs_dir.is_dir() else set()
    try:
        return _create(
            store,
            target,
            modelfile,
            Path(base_dir),
            quantize_to,
            progress or (lambda *a: None),
            pull,
        )
    finally:
        # intermediate blobs (an unquantized copy) and those of a failed create go away
        new = set(store.blobs_dir.iterdir()) - before if store.blobs_dir.is_dir() else set()
        store.prune(
            f"sha256:{p.name.removeprefix('sha256-')}"
            for p in new
            if p.name.startswith("sha256-") and len(p.name) == 71
        )


def _create(
    store: Store,
    target: names.Name,
    modelfile: Modelfile,
    base: Path,
    quantize_to: str | None,
    report: Progress,
    pull: Puller | None,
) -> ModelRef:
    if quantize_to is not None:
        quantize_to = quantize.parse_file_type(quantize_to)
    if modelfile.template is not None:
        from herd.template import parse_template

        parse_template(modelfile.template)  # TemplateError before anything is written
    try:
        old = store.read_manifest(target)[0]
    except (ModelNotFoundError, HerdError):
        old = None

    report("gathering model components", None, None, None)
    config = ConfigV2(
        model_format="",
        renderer=modelfile.renderer or "",
        parser=modelfile.parser or "",
        requires=modelfile.requires or "",
    )
    source = resolve_source(modelfile.from_, base, modelfile.path)
    if isinstance(source, Path) and _is_hf_folder(source):
        layers = [_converted_layer(store, source, report)]
    elif isinstance(source, Path):
        layers = [
            _gguf_layer(
                store,
                _gguf_in(source, modelfile.from_, modelfile.path),
                MEDIA_MODEL,
                source.name,
                report,
            )
        ]
    else:
        layers = _from_model(store, source, modelfile.from_, modelfile.path, config, report, pull)
    for cmd in modelfile.adapters:
        path = resolve_source(cmd, base, modelfile.path)
        assert isinstance(path, Path)
        layers.append(
            _gguf_layer(
                store, _gguf_in(path, cmd, modelfile.path), MEDIA_ADAPTER, path.name, report
            )
        )

    layers = [
        _maybe_quantize(store, x, quantize_to, report) if x.media_type == MEDIA_MODEL else x
        for x in layers
    ]
    model = next((x for x in layers if x.media_type == MEDIA_MODEL), None)
    if model is None:
        raise HerdError(f"{modelfile.from_.args}: has no GGUF model layer")
    facts = describe(open_gguf(store.blob_path(model.digest)))
    config.model_format = config.model_format or "gguf"
    config.model_family = facts.architecture
    config.model_families = [facts.architecture]
    config.model_type = facts.parameter_size
    config.file_type = facts.file_type

    def text_layer(data: bytes, media_type: str) -> Layer:
        layer = store.write_blob(data, media_type)
        report(f"using layer {layer.digest}", None, None, None)
        return layer

    if modelfile.template is not None:
        layers = _without(layers, MEDIA_TEMPLATE, MEDIA_PROMPT)
        layers.append(text_layer(modelfile.template.encode(), MEDIA_TEMPLATE))
    if modelfile.system is not None:
        layers = _without(layers, MEDIA_SYSTEM)
        if modelfile.system:
            layers.append(text_layer(modelfile.system.encode(), MEDIA_SYSTEM))
    for text in modelfile.licenses:
        if text:
            layers.append(text_layer(text.encode(), MEDIA_LICENSE))
    params = {**_inherited_params(store, layers), **modelfile.parameters}
    if params:
        layers = _without(layers, MEDIA_PARAMS)
        layers.append(text_layer(go_json(params, sort_keys=True), MEDIA_PARAMS))
    if modelfile.messages:
        layers = _without(layers, MEDIA_MESSAGES)
        layers.append(text_layer(go_json(modelfile.messages), MEDIA_MESSAGES))

    config.diff_ids = [x.digest for x in layers]
    config_layer = store.write_blob(config.to_bytes(), CONFIG_V1)
    report("writing manifest", None, None, None)
    store.write_manifest(target, Manifest(config_layer, tuple(layers)))
    if old is not None:
        store.prune(x.digest for x in old.all_layers())
    report("success", None, None, None)
    return store.resolve(target)


def _gguf_in(path: Path, cmd: Command, where: str) -> Path:
    """The GGUF file a FROM/ADAPTER path stands for (a file, or a folder holding one)."""
    if path.is_file():
        return path
    files = sorted(path.glob("*.gguf"))
    hf = [p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth")]
    if len(files) == 1 and not hf:
        return files[0]
    if hf and not files:
        raise ModelfileError(
            f"{cmd.args} is a Hugging Face folder ({', '.join(sorted(hf)[:3])}); herd "
            "converts those in FROM, not in ADAPTER: convert the adapter to GGUF first",
            cmd.line,
            cmd.column,
            where,
        )
    if len(files) > 1:
        raise ModelfileError(
            f"{cmd.args} holds several GGUF files ({', '.join(p.name for p in files)}); name one",
            cmd.line,
            cmd.column,
            where,
        )
    raise ModelfileError(
        f"{cmd.args}: no model files (*.gguf) in this folder", cmd.line, cmd.column, where
    )


def _is_hf_folder(path: Path) -> bool:
    """A folder of Hugging Face weights (and no GGUF): FROM converts it."""
    if not path.is_dir() or any(path.glob("*.gguf")):
        return False
    return any(p.suffix in _HF_WEIGHTS for p in path.iterdir())


def _converted_layer(store: Store, src: Path, report: Progress) -> Layer:
    """Convert a Hugging Face folder to an F16 GGUF (in a temp folder in the store, on
    the same disk as the blobs) and store it as the model layer."""
    from herd.convert import convert

    status = "converting model"
    report(status, None, None, None)
    store.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".herd-convert-", dir=store.root) as tmp:
        out = convert(
            src,
            Path(tmp) / "model.gguf",
            "f16",
            name=src.name,
            progress=lambda i, n, *_: report(status, None, n, i),
        )
        return _gguf_layer(store, out, MEDIA_MODEL, src.name, report)


def _check_gguf(path: Path) -> GGUFFile:
    try:
        return open_gguf(path)
    except GGUFError as e:
        raise HerdError(f"{e} (only GGUF files can be used in FROM and ADAPTER)") from None


def _gguf_layer(store: Store, path: Path, media_type: str, from_: str, report: Progress) -> Layer:
    """Copy a GGUF into the store (hashing as it goes) and return its layer."""
    g = _check_gguf(path)  # refuse anything that is not a readable GGUF before copying
    if media_type == MEDIA_MODEL and g.kv.get("general.type") == "adapter":
        media_type = MEDIA_ADAPTER
    elif media_type == MEDIA_MODEL and g.kv.get("general.type") in ("projector", "mmproj"):
        media_type = MEDIA_PROJECTOR
    blob = path.resolve()
    if blob.parent == store.blobs_dir.resolve() and _BLOB_NAME.fullmatch(blob.name):
        digest = "sha256:" + blob.name.removeprefix("sha256-")
        report(f"using existing layer {digest}", None, None, None)
        return Layer(media_type, digest, blob.stat().st_size, from_)
    size = path.stat().st_size
    with store.blob_writer() as w, open(path, "rb") as f:
        status = f"copying file {path.name}"
        while chunk := f.read(_COPY_CHUNK):
            w.write(chunk)
            report(status, f"file:{path}", size, w.size)
        layer = w.commit()
    report(f"using layer {layer.digest}", None, None, None)
    return Layer(media_type, layer.digest, layer.size, from_)


def _from_model(
    store: Store,
    name: str,
    cmd: Command,
    where: str,
    config: ConfigV2,
    report: Progress,
    pull: Puller | None,
) -> list[Layer]:
    """The layers of an existing model, each marked `from` it (Ollama's parseFromModel)."""
    try:
        n = names.parse(name)
    except HerdError as e:
        raise ModelfileError(
            f"FROM {name}: not a file, and not a model name ({e})", cmd.line, cmd.column, where
        ) from None
    try:
        manifest, _ = store.read_manifest(n, name)
    except ModelNotFoundError:
        if pull is None:
            raise ModelfileError(
                f"FROM {name}: no such file, and no model by that name (pull it first)",
                cmd.line,
                cmd.column,
                where,
            ) from None
        pull(store, n, report)
        manifest, _ = store.read_manifest(n, name)
    base = store.existing(n).display_shortest()
    with contextlib.suppress(OSError, ValueError):
        inherited = json.loads(store.blob_path(manifest.config.digest).read_bytes())
        if isinstance(inherited, dict):
            for key in ("renderer", "parser", "requires"):
                if not getattr(config, key) and isinstance(inherited.get(key), str):
                    setattr(config, key, inherited[key])
            if isinstance(inherited.get("model_format"), str):
                config.model_format = inherited["model_format"]
    out = []
    for layer in manifest.layers:
        if not store.has_blob(layer.digest):
            raise HerdError(
                f"model '{name}' is incomplete: blob {layer.digest} is missing; pull it again"
            )
        report(f"using existing layer {layer.digest}", None, None, None)
        out.append(Layer(layer.media_type, layer.digest, layer.size, base, layer.name))
    return out


def _maybe_quantize(store: Store, layer: Layer, to: str | None, report: Progress) -> Layer:
    if to is None:
        return layer
    g = open_gguf(store.blob_path(layer.digest))
    source = quantize.file_type_of(g)
    if source not in quantize.SOURCE_TYPES:
        raise HerdError(
            f"quantization is only supported for F16, BF16 and F32 models (this one is {source})"
        )
    if source == to:
        return layer
    status = f"quantizing {source} model to {to}"
    report(status, None, None, None)
    with store.blob_writer() as w:
        quantize.quantize(
            g, to, w.write, lambda done, total: report(status, "quantize", total, done)
        )
        new = w.commit()
    report(f"using layer {new.digest}", None, None, None)
    return Layer(MEDIA_MODEL, new.digest, new.size)


def _without(layers: list[Layer], *media_types: str) -> list[Layer]:
    return [x for x in layers if x.media_type not in media_types]


def _inherited_params(store: Store, layers: list[Layer]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        if layer.media_type == MEDIA_PARAMS:
            try:
                value = json.loads(store.blob_path(layer.digest).read_bytes())
            except (OSError, ValueError) as e:
                raise HerdError(f"params blob {layer.digest} is unreadable: {e}") from None
            if isinstance(value, dict):
                out.update(value)
    return out
