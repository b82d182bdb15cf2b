"""Which chat template a model uses."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from herd.template.jinja import JinjaTemplate

# general.architecture -> built-in template (src/herd/template/builtin/<name>.jinja)
BUILTIN = {"gemma3": "gemma3"}


def select_template(kv: dict[str, Any], override: str | None = None) -> JinjaTemplate | None:
    """The store's template text if given, else the GGUF's `tokenizer.chat_template`, else
    herd's built-in for `general.architecture`; None means: use the raw prompt."""
    if override:
        return JinjaTemplate(override)
    source = kv.get("tokenizer.chat_template")
    if isinstance(source, str) and source.strip():
        return JinjaTemplate(source)
    name = BUILTIN.get(str(kv.get("general.architecture", "")))
    return builtin(name) if name else None


@cache
def builtin(name: str) -> JinjaTemplate:
    """A built-in template by name, compiled once per process."""
    path = resources.files("herd.template") / "builtin" / f"{name}.jinja"
    return JinjaTemplate(path.read_text(encoding="utf-8"))
