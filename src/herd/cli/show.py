"""What `herd show` and the REPL's `/show` print, laid out like Ollama's `show`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from herd.cli.format import table
from herd.modelfile import quote
from herd.store import Store
from herd.store.layout import MEDIA_ADAPTER, go_float

if TYPE_CHECKING:
    from herd.gguf import TensorInfo
    from herd.store.ggufinfo import GGUFFacts


@dataclass
class ShowFacts:
    name: str  # store name, or the file path as given
    model_path: Path
    gguf: GGUFFacts
    tensors: list[TensorInfo]
    template: str | None  # template layer, else the GGUF's chat template
    system: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    license: list[str] = field(default_factory=list)
    template_layer: str | None = None  # the template the store holds (None: none)
    adapters: list[Path] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def capabilities(self) -> list[str]:
        arch, kv = self.gguf.architecture, self.gguf.kv
        caps = ["embedding" if f"{arch}.pooling_type" in kv else "completion"]
        if f"{arch}.vision.block_count" in kv:
            caps.append("vision")
        if self.template:
            from herd.template.parsers import template_capabilities

            caps += template_capabilities(self.template)  # tools, thinking
        if self.template and ".Suffix" in self.template:
            caps.append("insert")
        return caps


def is_model_path(model: str) -> bool:
    """A file path rather than a store name: an existing file, or anything ending in .gguf."""
    return Path(model).expanduser().is_file() or model.lower().endswith(".gguf")


def load_facts(model: str, store: Store) -> ShowFacts:
    """Facts about a store model or a .gguf path; HerdError subclasses for every failure."""
    # imported here: NumPy and gguf cost ~100 ms that other commands need not pay
    from herd.gguf import open_gguf
    from herd.store.ggufinfo import describe

    if is_model_path(model):
        path = Path(model).expanduser()
        g = open_gguf(path)
        facts = describe(g)
        return ShowFacts(model, path, facts, list(g.tensors.values()), facts.chat_template)
    ref = store.resolve(model)
    g = open_gguf(ref.model_path)
    facts = describe(g)
    manifest, _ = store.read_manifest(model)
    adapters = [store.blob_path(x.digest) for x in manifest.layers
                if x.media_type == MEDIA_ADAPTER]
    return ShowFacts(ref.name, ref.model_path, facts, list(g.tensors.values()),
                     ref.template or facts.chat_template, ref.system, ref.params, ref.license,
                     ref.template, adapters, ref.messages, ref.config)


def _section(header: str, rows: list[list[str]]) -> str:
    return f"  {header}\n" + table([["", *r] for r in rows]) + "\n"


def _head(text: str, n: int = 2) -> list[list[str]]:
    """The first n non-empty lines, then "..." when there are more (Ollama's show)."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    rows = [[x] for x in lines[:n]]
    return rows + [["..."]] if len(lines) > n else rows


def _backend() -> str:
    """The compute backend HERD_BACKEND (default auto) resolves to on this machine."""
    from herd import envconfig
    from herd.errors import BackendError
    from herd.ml import resolve_backend_name

    try:
        return resolve_backend_name(envconfig.backend())
    except BackendError as e:
        return f"none ({e})"


def render_info(f: ShowFacts, verbose: bool = False) -> str:
    g = f.gguf
    model_rows = [["architecture", g.architecture], ["parameters", g.parameter_size]]
    if g.context_length is not None:
        model_rows.append(["context length", str(g.context_length)])
    if g.embedding_length is not None:
        model_rows.append(["embedding length", str(g.embedding_length)])
    model_rows.append(["quantization", g.file_type])
    model_rows.append(["backend", _backend()])  # herd's own: which engine would run it
    out = [_section("Model", model_rows), _section("Capabilities", [[c] for c in f.capabilities])]
    if f.params:
        out.append(_section("Parameters", [line.split(None, 1) for line in
                                           render_parameters(f.params).splitlines()]))
    if f.system:
        out.append(_section("System", _head(f.system)))
    if f.license:
        out.append(_section("License", _head("\n".join(f.license))))
    if verbose:
        out.append(_section("Metadata", [[k, _short(v)] for k, v in sorted(g.kv.items())]))
        out.append(_section("Tensors", [[t.name, t.type.name, _go_list(list(reversed(t.shape)))]
                                        for t in f.tensors]))
    return "\n".join(out)


def _go_list(values: list[Any]) -> str:
    return "[" + " ".join(str(v) for v in values) + "]"


def _short(value: Any) -> str:
    """Long arrays elided as Ollama's verbose show does: "[a b ...+49150 more]"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, list):
        return str(value)
    width, shown = 1, 0
    for i, item in enumerate(value):
        w = len(str(item)) + (2 if i else 0)
        if width + w > 10 and i > 0:
            break
        width += w
        shown += 1
    if shown < len(value):
        return _go_list(value[:shown])[:-1] + f" ...+{len(value) - shown} more]"
    return _go_list(value)


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
    lines = ['# Modelfile generated by "herd show"',
             "# To build a new Modelfile based on this, replace FROM with:",
             f"# FROM {f.name}", "", f"FROM {f.model_path}"]
    lines.extend(f"ADAPTER {quote(str(p))}" for p in f.adapters)
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


# field -> (text, message when empty), for `show --license` and friends
def single_field(f: ShowFacts, which: str) -> str:
    if which == "modelfile":
        return render_modelfile(f)
    text, missing = {
        "license": ("\n".join(f.license), "No license was specified for this model."),
        "parameters": (render_parameters(f.params), "No parameters were specified for this model."),
        "system": (f.system or "", "No system message was specified for this model."),
        "template": (f.template or "", "No prompt template was specified for this model."),
    }[which]
    return text if text else missing
