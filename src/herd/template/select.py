"""Which chat template a model uses.

A template text from the store (a Modelfile's TEMPLATE, a registry model's template layer)
is a Go template, Ollama's format; herd also accepts Jinja there. A GGUF without one
carries a Jinja `tokenizer.chat_template`: when it renders exactly like one of herd's Go
built-ins on a set of probe conversations, that built-in is used (so tools and thinking work
the way Ollama's templates do); otherwise the Jinja itself is rendered, in a sandbox. A GGUF
with no template at all gets the built-in of its architecture.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from herd.errors import TemplateError
from herd.template.jinja import JinjaTemplate
from herd.template.ollama import Template

ChatTemplate = Template | JinjaTemplate

# general.architecture -> built-in template for GGUFs that carry none
BUILTIN = {"gemma3": "gemma3"}

# herd's Go built-ins: the marker a Jinja template of the family must contain, the markers
# it must contain and must not contain (so that a plain ChatML template does not get Qwen's
# tools and thinking), and the family's stop strings. More specific families come first.
GO_BUILTINS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], list[str]]] = {
    "qwen3": ("<|im_start|>", ("<think>", "<tool_call>"), (), ["<|im_start|>", "<|im_end|>"]),
    "qwen2.5": ("<|im_start|>", ("<tool_call>",), ("<think>",), ["<|im_start|>", "<|im_end|>"]),
    "chatml": ("<|im_start|>", (), ("tool", "<think>"), ["<|im_start|>", "<|im_end|>"]),
    "llama3": (
        "<|start_header_id|>",
        (),
        (),
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    "gemma3": ("<start_of_turn>", (), (), ["<end_of_turn>"]),
    "mistral": ("[INST]", (), (), ["[INST]", "[/INST]", "</s>"]),
    "phi3": ("<|end|>", (), ("tool",), ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]),
}

_USER = {"role": "user", "content": "What is the capital of France?"}
_SYSTEM = {"role": "system", "content": "You are a terse assistant."}
_ASSISTANT = {"role": "assistant", "content": "Paris."}
_USER2 = {"role": "user", "content": "And of Italy?"}
PROBES = [
    [_USER],
    [_SYSTEM, _USER],
    [_USER, _ASSISTANT, _USER2],
    [_SYSTEM, _USER, _ASSISTANT, _USER2],
]


def select_template(kv: dict[str, Any], override: str | None = None) -> ChatTemplate | None:
    """The store's template text if given, else the GGUF's `tokenizer.chat_template` (as
    the Go built-in it matches, or as Jinja), else herd's built-in for `general.architecture`;
    None means: use the raw prompt."""
    if override:
        return parse_template(override)
    source = kv.get("tokenizer.chat_template")
    if isinstance(source, str) and source.strip():
        name = match_builtin(source, _eos(kv))
        return go_builtin(name) if name else JinjaTemplate(source)
    name = BUILTIN.get(str(kv.get("general.architecture", "")))
    return go_builtin(name) if name else None


def parse_template(text: str) -> ChatTemplate:
    """A template text in either language: Go when it parses as Go and has no Jinja
    statements (`{%`, `{#`); Jinja when it parses as Jinja and not as Go, or has Jinja
    statements. Raises the Go parse error when neither parses (Ollama's format comes first)."""
    jinja_syntax = "{%" in text or "{#" in text
    try:
        go: Template | None = Template(text)
    except TemplateError as e:
        go, go_error = None, e
    if go is not None and not jinja_syntax:
        return go
    try:
        return JinjaTemplate(text)
    except TemplateError:
        if go is not None:
            return go
        raise go_error from None


def match_builtin(jinja_source: str, eos_token: str = "") -> str | None:
    """The Go built-in that renders every probe conversation exactly like this Jinja chat
    template (BOS left out: the tokenizer adds it), or None."""
    try:
        jinja = JinjaTemplate(jinja_source)
    except TemplateError:
        return None
    for name, (marker, needs, excludes, _) in GO_BUILTINS.items():
        if marker not in jinja_source or any(m not in jinja_source for m in needs):
            continue
        if any(m in jinja_source for m in excludes):
            continue
        go = go_builtin(name)
        try:
            if all(
                jinja.render(p, add_generation_prompt=True, eos_token=eos_token) == go.execute(p)
                for p in PROBES
            ):
                return name
        except TemplateError:
            continue
    return None


def _eos(kv: dict[str, Any]) -> str:
    tokens, eos = kv.get("tokenizer.ggml.tokens"), kv.get("tokenizer.ggml.eos_token_id")
    if isinstance(tokens, list) and isinstance(eos, int) and 0 <= eos < len(tokens):
        return str(tokens[eos])
    return ""


@cache
def go_builtin(name: str) -> Template:
    """A Go built-in (src/herd/template/builtin/<name>.gotmpl), parsed once per process."""
    path = resources.files("herd.template") / "builtin" / f"{name}.gotmpl"
    stop = GO_BUILTINS[name][3] if name in GO_BUILTINS else []
    return Template(path.read_text(encoding="utf-8"), name=name, stop=stop)


@cache
def builtin(name: str) -> JinjaTemplate:
    """A Jinja built-in (src/herd/template/builtin/<name>.jinja), compiled once per process."""
    path = resources.files("herd.template") / "builtin" / f"{name}.jinja"
    return JinjaTemplate(path.read_text(encoding="utf-8"))
