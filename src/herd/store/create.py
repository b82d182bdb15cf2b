"""`create`: build a model in the store from a Modelfile, the way Ollama's create does.

Layers, in Ollama's order: the model (a GGUF copied in, a Hugging Face folder converted
to an F16 GGUF, quantized if asked, or the layers of an existing model), its projector,
adapters, a draft model (`herd.store.draft`), then template, system, licenses, params and
messages; then the config blob and, last, the manifest. Every blob goes in through a temp
file and a rename, so a failure leaves no half-written blob and no manifest. A GGUF that
already is a blob of the store (the server stages uploaded files as links to their blobs)
is used in place.

A model in llama.cpp's two-file layout takes two FROM lines, in either order: the text
model (a GGUF, a folder or a model name) and its projector GGUF (`mmproj`), told apart
by their contents (`general.architecture` "clip", or `general.type` "projector" or
"mmproj": Ollama's projector layer). A folder holding exactly such a pair is both. A
projector file replaces the one a FROM model has; without one, the model's is kept.
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
from herd.store.adapters import checked_adapter, is_peft_dir
from herd.store.draft import draft_config, stored_manifest, with_draft
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
    draft_quantize: str | None = None,
) -> ModelRef:
    """Create (or replace) model `name` from `modelfile`; FROM paths are relative to
    `base_dir`. `progress(status, digest, total, completed)` gets Ollama's create steps."""
    target = store.existing(names.parse(name))
    before = set(store.blobs_dir.iterdir()) if store.blobs_dir.is_dir() else set()
    try:
        with store.disk_full_guard(f"creating {name}"):  # the finally below undoes it
            return _create(
                store,
                target,
                modelfile,
                Path(base_dir),
                quantize_to,
                progress or (lambda *a: None),
                pull,
                draft_quantize,
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
    draft_quantize: str | None = None,
) -> ModelRef:
    if quantize_to is not None:
        quantize_to = quantize.parse_file_type(quantize_to)
    check_renderer_parser(modelfile)
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
    layers = _from_layers(store, modelfile, base, config, report, pull)
    model_layer = next((x for x in layers if x.media_type == MEDIA_MODEL), None)
    for cmd in modelfile.adapters:  # each checked against the model (or converted) first
        path = resolve_source(cmd, base, modelfile.path)
        assert isinstance(path, Path) and model_layer is not None
        src = path if is_peft_dir(path) else _gguf_in(path, cmd, modelfile.path)
        with tempfile.TemporaryDirectory(prefix=".herd-convert-", dir=store.root) as tmp:
            gguf = checked_adapter(src, store.blob_path(model_layer.digest), Path(tmp), cmd,
                                   modelfile.path, report)  # fmt: skip
            layers.append(_gguf_layer(store, gguf, MEDIA_ADAPTER, path.name, report))
    layers = with_draft(store, modelfile, base, layers, report, pull, draft_quantize)

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
    projector = next((x for x in layers if x.media_type == MEDIA_PROJECTOR), None)
    if projector is not None:  # as Ollama: every GGUF layer's architecture ("clip")
        config.model_families.append(open_gguf(store.blob_path(projector.digest)).architecture)
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

    config.draft = draft_config(store, layers)  # a DRAFT's, or one FROM's model had
    config.diff_ids = [x.digest for x in layers]
    config_layer = store.write_blob(config.to_bytes(), CONFIG_V1)
    report("writing manifest", None, None, None)
    store.write_manifest(target, Manifest(config_layer, tuple(layers)))
    if old is not None:
        store.prune(x.digest for x in old.all_layers())
    report("success", None, None, None)
    return store.resolve(target)


def _from_layers(
    store: Store,
    modelfile: Modelfile,
    base: Path,
    config: ConfigV2,
    report: Progress,
    pull: Puller | None,
) -> list[Layer]:
    """The layers the FROM lines stand for: a model's (its projector too, where it has
    one) and a projector file's. What each file is comes from its header, and the pair is
    checked before anything is copied."""
    where = modelfile.path
    sources: list[tuple[Command, Path | str, str]] = []  # (FROM, source, media type)
    for cmd in modelfile.froms:
        source = resolve_source(cmd, base, where)
        if isinstance(source, str) or _is_hf_folder(source):
            sources.append((cmd, source, MEDIA_MODEL))
        else:
            sources += [(cmd, p, _gguf_kind(_check_gguf(p))) for p in _ggufs_in(source, cmd, where)]
    _check_pair(sources, where)
    layers: list[Layer] = []
    for cmd, source, kind in sources:
        if kind != MEDIA_MODEL:
            continue
        if isinstance(source, str):
            layers += _from_model(store, source, cmd, where, config, report, pull)
        elif source.is_dir():
            layers.append(_converted_layer(store, source, report))
        else:
            layers.append(_gguf_layer(store, source, MEDIA_MODEL, source.name, report))
    for _, source, kind in sources:
        if kind == MEDIA_PROJECTOR:
            assert isinstance(source, Path)
            model_at = next((i for i, x in enumerate(layers) if x.media_type == MEDIA_MODEL), -1)
            layers = _without(layers, MEDIA_PROJECTOR)  # the FROM model's, replaced
            layers.insert(model_at + 1, _gguf_layer(store, source, kind, source.name, report))
    return layers


def _check_pair(sources: list[tuple[Command, Path | str, str]], where: str) -> None:
    """One model and at most one projector file: ModelfileError at the FROM that is not."""
    models = [(c, s) for c, s, kind in sources if kind == MEDIA_MODEL]
    projectors = [(c, s) for c, s, kind in sources if kind == MEDIA_PROJECTOR]
    for cmd, source, kind in sources:
        if kind == MEDIA_ADAPTER:
            raise ModelfileError(
                f"FROM {cmd.args}: {_shown(source)} is an adapter (general.type 'adapter'), "
                "not a model: name it in an ADAPTER line",
                cmd.line,
                cmd.column,
                where,
            )
    if len(models) > 1:
        cmd, source = models[1]
        first = models[0][1]
        raise ModelfileError(
            f"FROM {cmd.args}: two models ({_shown(first)} and {_shown(source)}); a second "
            "FROM may only be a projector GGUF (llama.cpp's mmproj, general.architecture "
            "'clip')",
            cmd.line,
            cmd.column,
            where,
        )
    if len(projectors) > 1:
        cmd, source = projectors[1]
        raise ModelfileError(
            f"FROM {cmd.args}: a second projector file ({_shown(source)}); a model takes one",
            cmd.line,
            cmd.column,
            where,
        )
    if projectors and not models:
        cmd, source = projectors[0]
        raise ModelfileError(
            f"FROM {cmd.args}: {_shown(source)} is a projector file (general.architecture "
            "'clip'), not a model: add a FROM line for the text model it belongs to",
            cmd.line,
            cmd.column,
            where,
        )


def _shown(source: Path | str) -> str:
    return source.name if isinstance(source, Path) else source


def _gguf_kind(g: GGUFFile) -> str:
    """The layer a GGUF makes: adapter, projector (llama.cpp's mmproj, a `clip` file) or
    model (Ollama's rules: `general.type`, plus the `clip` architecture)."""
    kind = g.kv.get("general.type")
    if kind == "adapter":
        return MEDIA_ADAPTER
    if g.kv.get("general.architecture") == "clip" or kind in ("projector", "mmproj"):
        return MEDIA_PROJECTOR
    return MEDIA_MODEL


def _ggufs_in(path: Path, cmd: Command, where: str) -> list[Path]:
    """The GGUF file(s) a FROM path stands for: the file, or a folder's one GGUF, or its
    two when they are a model and its projector."""
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) == 2:
            kinds = sorted(_gguf_kind(_check_gguf(p)) for p in files)
            if kinds == sorted([MEDIA_MODEL, MEDIA_PROJECTOR]):
                return files
    return [_gguf_in(path, cmd, where)]


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
            f"{cmd.args} is a Hugging Face folder ({', '.join(sorted(hf)[:3])}) without an "
            "adapter_config.json: ADAPTER takes a LoRA GGUF or a PEFT adapter folder",
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
        raise HerdError(f"{e} (only GGUF files can be used in FROM, ADAPTER and DRAFT)") from None


def _gguf_layer(store: Store, path: Path, media_type: str, from_: str, report: Progress) -> Layer:
    """Copy a GGUF into the store (hashing as it goes) and return its layer."""
    g = _check_gguf(path)  # refuse anything that is not a readable GGUF before copying
    if media_type == MEDIA_MODEL:
        media_type = _gguf_kind(g)
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
    n, manifest = stored_manifest(store, name, cmd, where, report, pull)
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


def check_renderer_parser(modelfile: Modelfile) -> None:
    """RENDERER and PARSER name Ollama's Go renderers and parsers: herd takes the parsers
    it has (herd.template.parsers.NAMED) and refuses the rest, and every renderer (Ollama's
    are for architectures herd does not run; herd renders with the template), rather than
    silently ignore what a Modelfile asks for."""
    from herd.template.parsers import NAMED

    for cmd in modelfile.values("renderer"):
        if not cmd.args:
            continue
        raise ModelfileError(
            f"RENDERER {cmd.args!r} is not supported: herd renders prompts with the model's "
            "template (use TEMPLATE); supported renderers: none",
            cmd.line,
            cmd.column,
            modelfile.path,
        )
    for cmd in modelfile.values("parser"):
        if cmd.args and cmd.args not in NAMED:
            raise ModelfileError(
                f"PARSER {cmd.args!r} is not supported; supported parsers: {', '.join(NAMED)}",
                cmd.line,
                cmd.column,
                modelfile.path,
            )


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
