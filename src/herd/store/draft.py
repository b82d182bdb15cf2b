"""`DRAFT` at create: the draft model a model speculates with, stored as Ollama's draft
layer (`application/vnd.ollama.image.draft`, `manifest.MediaTypeImageDraft`) and named in
the config blob's `draft` ({model_format, architecture}, Ollama's `model.Draft`).

DRAFT names a GGUF file (or a folder holding one), a Hugging Face folder (converted to an
F16 GGUF as FROM converts one), or a model in the store (its model blob, used in place;
pulled when missing, as FROM pulls). Ollama takes paths only; a name is herd's addition.
Before anything is copied the draft is checked against the model it drafts for with the
runner's rules (`herd.runner.draft.check_draft`, read here from the GGUFs' metadata since
the store does not load models): a model that generates, with the target's tokens id for
id and as many logits; so a model `create` accepts loads. A FROM model's own draft layer
is inherited, and a DRAFT line replaces it. `draft_quantize` (Ollama's `--draft-quantize`)
quantizes the draft layer, which must then be F32, F16 or BF16.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from herd.errors import HerdError, ModelfileError, ModelNotFoundError
from herd.gguf import GGUFFile, open_gguf
from herd.modelfile import Command, Modelfile, resolve_source
from herd.store import names, quantize
from herd.store.layout import MEDIA_DRAFT, MEDIA_MODEL, Layer, Manifest
from herd.store.store import ModelRef, Store
from herd.store.wheels import Progress

if TYPE_CHECKING:
    Puller = Callable[[Store, names.Name, Progress], ModelRef]


def with_draft(
    store: Store,
    modelfile: Modelfile,
    base: Path,
    layers: list[Layer],
    report: Progress,
    pull: Puller | None,
    draft_quantize: str | None = None,
) -> list[Layer]:
    """`layers` with the Modelfile's DRAFT (checked against their model layer) in place of
    any draft they had, its layer quantized to `draft_quantize` when given."""
    cmd = modelfile.draft
    if cmd is None:
        if draft_quantize:
            raise HerdError("--draft-quantize requires a DRAFT model")  # Ollama's words
        return layers
    to = quantize.parse_file_type(draft_quantize) if draft_quantize else None
    model = next((x for x in layers if x.media_type == MEDIA_MODEL), None)
    if model is None:
        raise HerdError(f"{modelfile.from_.args}: has no GGUF model layer")
    layer = _draft_layer(store, cmd, base, store.blob_path(model.digest), modelfile.path,
                         report, pull)  # fmt: skip
    if to is not None:
        layer = _quantized(store, layer, to, report)
    return [x for x in layers if x.media_type != MEDIA_DRAFT] + [layer]


def draft_config(store: Store, layers: list[Layer]) -> dict[str, str] | None:
    """The config blob's `draft` for a model with a draft layer (inherited or new)."""
    layer = next((x for x in layers if x.media_type == MEDIA_DRAFT), None)
    if layer is None:
        return None
    return {
        "model_format": "gguf",
        "architecture": open_gguf(store.blob_path(layer.digest)).architecture,
    }


def check_draft_gguf(target: GGUFFile, draft: GGUFFile, draft_name: str) -> None:
    """HerdError naming what differs unless `draft` can draft for `target`: the runner's
    check (`herd.runner.draft.check_draft`) on metadata and tensor shapes."""
    kind = draft.kv.get("general.type")
    arch = draft.architecture
    if kind == "adapter" or arch == "clip" or kind in ("projector", "mmproj"):
        what = "an adapter" if kind == "adapter" else "a projector file"
        raise HerdError(f"{draft_name} is {what}, not a model: it cannot draft")
    if f"{arch}.pooling_type" in draft.kv or f"{arch}.classifier.output_labels" in draft.kv:
        raise HerdError(f"{draft_name} is an embedding or rerank model: it cannot draft")
    ours = target.kv.get("tokenizer.ggml.tokens")
    theirs = draft.kv.get("tokenizer.ggml.tokens")
    if not isinstance(ours, list) or not isinstance(theirs, list):
        raise HerdError("the draft or its model has no token list to compare")
    if len(ours) != len(theirs):
        raise HerdError(
            f"the draft model {draft_name} has {len(theirs)} tokens, the model {len(ours)}: "
            "a draft must use its model's vocabulary"
        )
    if ours != theirs:
        at = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
        raise HerdError(
            f"the draft model {draft_name}'s token {at} is {theirs[at]!r}, the model's is "
            f"{ours[at]!r}: a draft must use its model's vocabulary"
        )
    rows = [_n_vocab(g) for g in (target, draft)]
    if None not in rows and rows[0] != rows[1]:  # padded embeddings: logits of other widths
        raise HerdError(
            f"the draft model {draft_name} scores {rows[1]} tokens, the model {rows[0]}: "
            "a draft must use its model's vocabulary"
        )


def _n_vocab(g: GGUFFile) -> int | None:
    """The logits' width, as the models read it: token_embd.weight's rows."""
    t = g.tensors.get("token_embd.weight")
    return t.shape[0] if t is not None else None


def _draft_layer(
    store: Store,
    cmd: Command,
    base: Path,
    model_blob: Path,
    where: str,
    report: Progress,
    pull: Puller | None,
) -> Layer:
    # create's GGUF helpers; create imports this module at its top
    from herd.store.create import _check_gguf, _gguf_in, _gguf_layer, _is_hf_folder

    def check(path: Path, name: str) -> None:
        try:
            check_draft_gguf(open_gguf(model_blob), _check_gguf(path), name)
        except HerdError as e:
            raise ModelfileError(f"DRAFT {cmd.args}: {e}", cmd.line, cmd.column, where) from None

    source = resolve_source(cmd, base, where)
    if isinstance(source, str):  # a model in the store: its model blob, in place
        layer = _stored(store, source, cmd, where, report, pull)
        check(store.blob_path(layer.digest), source)
        report(f"using existing layer {layer.digest}", None, None, None)
        return layer
    if _is_hf_folder(source):
        from herd.convert import convert

        status = "converting draft model"
        report(status, None, None, None)
        store.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".herd-convert-", dir=store.root) as tmp:
            out = convert(source, Path(tmp) / "draft.gguf", "f16", name=source.name,
                          progress=lambda i, n, *_: report(status, None, n, i))  # fmt: skip
            check(out, source.name)
            return _gguf_layer(store, out, MEDIA_DRAFT, source.name, report)
    path = _gguf_in(source, cmd, where)
    check(path, path.name)
    return _gguf_layer(store, path, MEDIA_DRAFT, path.name, report)


def stored_manifest(
    store: Store, name: str, cmd: Command, where: str, report: Progress, pull: Puller | None
) -> tuple[names.Name, Manifest]:
    """The manifest of the model a FROM or DRAFT line names, pulled first when missing and
    `pull` is given; a ModelfileError at that line for a bad name or a missing model."""
    word = cmd.directive.upper()
    try:
        n = names.parse(name)
    except HerdError as e:
        raise ModelfileError(
            f"{word} {name}: not a file, and not a model name ({e})", cmd.line, cmd.column, where
        ) from None
    try:
        manifest, _ = store.read_manifest(n, name)
    except ModelNotFoundError:
        if pull is None:
            raise ModelfileError(
                f"{word} {name}: no such file, and no model by that name (pull it first)",
                cmd.line,
                cmd.column,
                where,
            ) from None
        pull(store, n, report)
        manifest, _ = store.read_manifest(n, name)
    return n, manifest


def _stored(
    store: Store, name: str, cmd: Command, where: str, report: Progress, pull: Puller | None
) -> Layer:
    """The draft layer for a stored model: its model blob, marked `from` it."""
    n, manifest = stored_manifest(store, name, cmd, where, report, pull)
    model = manifest.first(MEDIA_MODEL)
    if model is None or not store.has_blob(model.digest):
        raise ModelfileError(
            f"DRAFT {name}: the model has no GGUF model layer in the store (pull it again)",
            cmd.line,
            cmd.column,
            where,
        )
    return Layer(MEDIA_DRAFT, model.digest, model.size, store.existing(n).display_shortest())


def _quantized(store: Store, layer: Layer, to: str, report: Progress) -> Layer:
    g = open_gguf(store.blob_path(layer.digest))
    source = quantize.file_type_of(g)
    if source not in quantize.SOURCE_TYPES:  # Ollama's words
        raise HerdError(f"draft quantization requires an unquantized draft model, got {source}")
    if source == to:
        return layer
    status = f"quantizing {source} draft model to {to}"
    report(status, None, None, None)
    with store.blob_writer() as w:
        quantize.quantize(
            g, to, w.write, lambda done, total: report(status, "quantize", total, done)
        )
        new = w.commit()
    report(f"using layer {new.digest}", None, None, None)
    return Layer(MEDIA_DRAFT, new.digest, new.size)
