"""Chat templates: sandboxed Jinja (`tokenizer.chat_template`) and herd's built-ins."""

from herd.template.jinja import JinjaTemplate
from herd.template.select import builtin, select_template

__all__ = ["JinjaTemplate", "builtin", "select_template"]
