"""What `herd show` and the REPL's `/show` print, laid out like Ollama's `show`.

The facts themselves (what a model is and can do) live in `herd/store/facts.py`.
"""

from __future__ import annotations

from typing import Any

from herd.cli.format import table
from herd.store.facts import ShowFacts, render_modelfile, render_parameters


def _section(header: str, rows: list[list[str]]) -> str:
    return f"  {header}\n" + table([["", *r] for r in rows]) + "\n"


def _head(text: str, n: int = 2) -> list[list[str]]:
    """The first n non-empty lines, then "..." when there are more (Ollama's show)."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    rows = [[_clip(x)] for x in lines[:n]]
    return rows + [["..."]] if len(lines) > n else rows


def _backend() -> str:
    """The compute backend HERD_BACKEND (default auto) resolves to on this machine, and
    the devices it would run a model on."""
    from herd import envconfig
    from herd.errors import BackendError
    from herd.ml import BackendOptions, default_devices, resolve_backend_name

    try:
        name = resolve_backend_name(envconfig.backend())
        devices = default_devices(name, BackendOptions(**envconfig.backend_options()))
    except BackendError as e:
        return f"none ({e})"
    return f"{name} ({', '.join(d.name for d in devices)})"


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
    if f.projector_info is not None:
        out.append(_section("Projector", _projector_rows(f.projector_info)))
    if f.params:
        out.append(
            _section(
                "Parameters",
                [line.split(None, 1) for line in render_parameters(f.params).splitlines()],
            )
        )
    if f.system:
        out.append(_section("System", _head(f.system)))
    if f.license:
        out.append(_section("License", _head("\n".join(f.license))))
    if verbose:
        out.append(_section("Metadata", [[_clip(k), _short(v)] for k, v in sorted(g.kv.items())]))
        tensors = [[_clip(t.name), t.type, _go_list(list(reversed(t.shape)))] for t in f.tensors]
        out.append(_section("Tensors", tensors))
    return "\n".join(out)


def _projector_rows(info: dict[str, Any]) -> list[list[str]]:
    """Ollama's Projector section: architecture, parameters, the vision tower's embedding
    length and the projection's dimensions (each when the metadata has it)."""
    from herd.store.ggufinfo import human_number

    arch = str(info.get("general.architecture") or "")
    rows = [["architecture", arch]] if arch else []
    if isinstance(info.get("general.parameter_count"), int):
        rows.append(["parameters", human_number(info["general.parameter_count"])])
    for label, key in (("embedding length", "embedding_length"), ("dimensions", "projection_dim")):
        value = info.get(f"{arch}.vision.{key}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            rows.append([label, f"{value:g}" if isinstance(value, float) else str(value)])
    return rows


def _go_list(values: list[Any]) -> str:
    return "[" + " ".join(str(v) for v in values) + "]"


MAX_TEXT = 200  # characters of one name or value `show -v` prints (a file may hold MBs)


def _clip(text: str) -> str:
    """A name or value cut to MAX_TEXT characters, with a marker saying how much is left."""
    if len(text) <= MAX_TEXT:
        return text
    return f"{text[:MAX_TEXT]}...(+{len(text) - MAX_TEXT} characters)"


def _short(value: Any) -> str:
    """Long arrays elided as Ollama's verbose show does: "[a b ...+49150 more]"; long
    strings and items cut (`_clip`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, list):
        return _clip(str(value))
    value = [_clip(str(v)) for v in value[:64]] + value[64:]  # at most 64 are ever shown
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
