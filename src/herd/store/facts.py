"""What a model is and can do: the facts `/api/show`, `herd show` and the server's
capability checks all read, and the Modelfile and parameter text `/api/show` returns.

The CLI lays them out for a terminal (`cli/show.py`); the server answers them as JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from herd.modelfile import quote
from herd.store.layout import MEDIA_ADAPTER, MEDIA_PROJECTOR, go_float
from herd.store.store import Store

if TYPE_CHECKING:  # at run time only load_facts needs gguf (~100 ms that `herd list` skips)
    from herd.gguf import TensorInfo
    from herd.store.ggufinfo import GGUFFacts


@dataclass(frozen=True)
class TensorFacts:
    name: str
    type: str  # GGML type name: "F16", "Q4_K"
    shape: tuple[int, ...]  # NumPy order (outermost first), as the GGUF reader gives it


@dataclass
class ShowFacts:
    name: str  # store name, or the file path as given
    model_path: Path
    gguf: GGUFFacts
    tensors: list[TensorFacts]
    template: str | None  # template layer, else the GGUF's chat template
    system: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    license: list[str] = field(default_factory=list)
    template_layer: str | None = None  # the template the store holds (None: none)
    adapters: list[Path] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    projector: GGUFFacts | None = None  # the projector layer's GGUF (llama.cpp's mmproj)
    draft: Path | None = None  # the draft layer's blob (Modelfile DRAFT)

    @property
    def capabilities(self) -> list[str]:
        vision = self.projector is not None
        parser = self.config.get("parser")
        return capabilities(
            self.gguf.architecture,
            self.gguf.kv,
            self.template,
            vision=vision,
            parser=parser if isinstance(parser, str) else "",
        )

    @property
    def projector_info(self) -> dict[str, Any] | None:
        """/api/show's `projector_info`: the vision part's GGUF metadata with its
        `general.parameter_count`, like `model_info`. From the projector layer when the
        model has one (as Ollama); for a single GGUF that carries its vision tower
        (Ollama's own layout, where Ollama gives none) the `<arch>.vision.*` keys and the
        vision tensors' count, so `show` can describe the projector either way. None for
        a model without vision."""
        if self.projector is not None:
            p = self.projector
            return {**p.kv, "general.parameter_count": p.parameter_count}
        arch, kv = self.gguf.architecture, self.gguf.kv
        if f"{arch}.vision.block_count" not in kv:
            return None
        prefix = f"{arch}.vision."
        count = sum(math.prod(t.shape) for t in self.tensors if t.name.startswith(VISION_TENSORS))
        info: dict[str, Any] = {"general.architecture": arch, "general.parameter_count": count}
        info.update((k, v) for k, v in kv.items() if k.startswith(prefix))
        return info


# the tensors of a vision tower and its projector in a single GGUF (Ollama's names)
VISION_TENSORS = ("v.", "mm.")


def capabilities(
    arch: str,
    kv: dict[str, Any],
    template: str | None,
    *,
    vision: bool = False,
    parser: str = "",
) -> list[str]:
    """What a model can do, by Ollama's rules: `pooling_type` -> embedding, else
    completion (herd's: `pooling_type` 4, llama.cpp's rank, or a classifier's labels
    without one -> rerank alone, a cross-encoder that neither embeds nor completes);
    `<arch>.vision.block_count` -> vision (`vision`: the model has it some other way, a
    projector file); the template's or the named parser's (PARSER) tools and thinking;
    the template's `.Suffix` (insert)."""
    caps = ["embedding" if f"{arch}.pooling_type" in kv else "completion"]
    if is_rank(arch, kv):
        caps = ["rerank"]
    if vision or f"{arch}.vision.block_count" in kv:
        caps.append("vision")
    if template or parser:
        from herd.template.infer import template_capabilities
        from herd.template.parsers import named_capabilities

        given = set(named_capabilities(parser))
        given |= set(template_capabilities(template)) if template else set()
        caps += [c for c in ("tools", "thinking") if c in given]
    if template and ".Suffix" in template:
        caps.append("insert")
    return caps


def is_rank(arch: str, kv: dict[str, Any]) -> bool:
    """A rerank model: pooling type 4 (rank), or classifier labels and no pooling type
    (llama.cpp's conversions of BERT cross-encoders, run with --reranking)."""
    pooling = kv.get(f"{arch}.pooling_type")
    return pooling == 4 or pooling is None and f"{arch}.classifier.output_labels" in kv


def is_model_path(model: str) -> bool:
    """A file path rather than a store name: an existing file, or anything ending in .gguf."""
    return Path(model).expanduser().is_file() or model.lower().endswith(".gguf")


def load_facts(model: str, store: Store) -> ShowFacts:
    """Facts about a store model or a .gguf path; HerdError subclasses for every failure."""
    from herd.gguf import open_gguf
    from herd.store.ggufinfo import describe

    if is_model_path(model):
        path = Path(model).expanduser()
        g = open_gguf(path)
        facts = describe(g)
        return ShowFacts(model, path, facts, _tensors(g.tensors.values()), facts.chat_template)
    ref = store.resolve(model)
    g = open_gguf(ref.model_path)
    facts = describe(g)
    manifest, _ = store.read_manifest(model)
    adapters = [store.blob_path(x.digest) for x in manifest.layers if x.media_type == MEDIA_ADAPTER]
    projectors = [x.digest for x in manifest.layers if x.media_type == MEDIA_PROJECTOR]
    projector = describe(open_gguf(store.blob_path(projectors[0]))) if projectors else None
    return ShowFacts(
        ref.name,
        ref.model_path,
        facts,
        _tensors(g.tensors.values()),
        ref.template or facts.chat_template,
        ref.system,
        ref.params,
        ref.license,
        ref.template,
        adapters,
        ref.messages,
        ref.config,
        projector,
        ref.draft,
    )


def _tensors(infos: Iterable[TensorInfo]) -> list[TensorFacts]:
    return [TensorFacts(t.name, t.type.name, t.shape) for t in infos]


def go_value(v: Any) -> str:
    """A parameter value as Go's %#v prints it: strings quoted, 1.0 as 1."""
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v == int(v):
        return str(int(v))
    return str(v)


def render_parameters(params: dict[str, Any]) -> str:
    """`stop "<|im_end|>"` lines, one per list item, keys padded to 30 like Ollama."""
    lines = []
    for key in sorted(params):
        values = params[key] if isinstance(params[key], list) else [params[key]]
        lines.extend(f"{key:<30} {go_value(v)}" for v in values)
    return "\n".join(lines)


def render_modelfile(f: ShowFacts) -> str:
    """Ollama's `show --modelfile`: a header, then `Model.String()`'s directives."""
    lines = [
        '# Modelfile generated by "herd show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {f.name}",
        "",
        f"FROM {f.model_path}",
    ]
    lines.extend(f"ADAPTER {quote(str(p))}" for p in f.adapters)
    if f.draft is not None:  # Ollama's Model.String(): after the adapters
        lines.append(f"DRAFT {quote(str(f.draft))}")
    if f.template_layer is not None:
        lines.append(f"TEMPLATE {quote(f.template_layer)}")
    if f.system:
        lines.append(f"SYSTEM {quote(f.system)}")
    for key in ("renderer", "parser"):
        if isinstance(f.config.get(key), str) and f.config[key]:
            lines.append(f"{key.upper()} {quote(f.config[key])}")
    for key in sorted(f.params):
        values = f.params[key] if isinstance(f.params[key], list) else [f.params[key]]
        lines.extend(f"PARAMETER {key} {quote(_plain(v))}" for v in values)
    lines.extend(f"LICENSE {quote(text)}" for text in f.license)
    for m in f.messages:
        lines.append(f"MESSAGE {m.get('role', '')} {quote(str(m.get('content', '')))}")
    return "\n".join(lines) + "\n"


def _plain(v: Any) -> str:
    """A value as Go's %v prints it (1 not 1.0, true not True)."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return go_float(v)
    return str(v)
