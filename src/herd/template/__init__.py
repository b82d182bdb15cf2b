"""Chat templates: Ollama's Go templates, sandboxed Jinja (`tokenizer.chat_template`),
herd's built-ins, and the parsers that turn model output into thinking and tool calls."""

from herd.template.jinja import JinjaTemplate
from herd.template.ollama import Template
from herd.template.select import (
    ChatTemplate,
    builtin,
    go_builtin,
    match_builtin,
    parse_template,
    select_template,
)

__all__ = [
    "ChatTemplate",
    "JinjaTemplate",
    "Template",
    "builtin",
    "go_builtin",
    "match_builtin",
    "parse_template",
    "select_template",
]
