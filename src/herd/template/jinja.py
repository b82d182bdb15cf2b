"""Jinja chat templates (`tokenizer.chat_template`), rendered as transformers renders them.

Templates come from model files, so they are untrusted code: they run in Jinja's immutable
sandbox, with bounds on output size, on `range` iterations and on `*`/`**`, and every failure
becomes a `TemplateError` that names the template line.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from herd.errors import TemplateError

MAX_OUTPUT = 16 * 1024 * 1024  # characters; real prompts are far below any context length
MAX_RANGE_TOTAL = 1_000_000  # `range` elements per render: bounds nested-loop run time
_FILENAME = "<template>"  # jinja's name for templates from strings; found in tracebacks


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to mark assistant text for
    training masks. Templates that carry it must still parse; the body renders unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that, as in transformers, refuses underscore names (CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, with `*` and `**` checked before they run: `'x' * 10**10` would allocate
    gigabytes long before the output bound could see it."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int):
                    if len(seq) * n > MAX_OUTPUT:
                        raise jinja2.exceptions.SecurityError("repetition result too large")
            return operator.mul(left, right)
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 4096:
            raise jinja2.exceptions.SecurityError("power result too large")
        return operator.pow(left, right)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' filter: jinja's own escapes HTML characters, which prompts must not get.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _RangeBudget:
    """`range` for one render: the sandbox caps each range at 100000, not their total."""

    def __init__(self, total: int) -> None:
        self.left = total

    def __call__(self, *args: int) -> range:
        r = safe_range(*args)
        self.left -= len(r)
        if self.left < 0:
            raise jinja2.exceptions.SecurityError("template iterates too many times")
        return r


def _environment() -> _Environment:
    # Same options, helpers and filters as transformers' apply_chat_template.
    env = _Environment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


_ENV = _environment()


def _template_line(exc: BaseException) -> int | None:
    """The template line where `exc` was raised: jinja rewrites tracebacks so that template
    code appears as frames of `_FILENAME` with template line numbers."""
    line = getattr(exc, "lineno", None) if isinstance(exc, jinja2.TemplateSyntaxError) else None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _error(what: str, exc: BaseException) -> TemplateError:
    line = _template_line(exc)
    where = f" at line {line}" if line is not None else ""
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return TemplateError(f"chat template {what}{where}: {message}")


class JinjaTemplate:
    """A chat template compiled once; `render` may be called from several threads."""

    def __init__(self, source: str, *, max_output: int = MAX_OUTPUT) -> None:
        self.source = source
        self.max_output = max_output
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise _error("does not parse", e) from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        think: bool | str | None = None,
        bos_token: str = "",
        eos_token: str = "",
        **extra: Any,
    ) -> str:
        """The prompt text for `messages` (dicts with `role`, `content`, ...). `extra` reaches
        the template as variables (e.g. `documents`). `think` (Ollama's) reaches it as the
        de-facto variables `enable_thinking` and, for a level, `reasoning_effort`."""
        context: dict[str, Any] = {
            # transformers drops None-valued keys: templates test for a key's presence.
            "messages": [{k: v for k, v in m.items() if v is not None} for m in messages],
            "tools": tools,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": bos_token,
            "eos_token": eos_token,
            "range": _RangeBudget(MAX_RANGE_TOTAL),
            **extra,
        }
        if think is not None:
            context.setdefault("enable_thinking", think is not False)
            if isinstance(think, str):
                context.setdefault("reasoning_effort", think)
        try:
            return self._collect(self._template.generate(context))
        except TemplateError:
            raise
        except Exception as e:  # template code can raise anything; callers get one type
            raise _error("failed", e) from None

    def _collect(self, chunks: Iterator[str]) -> str:
        out: list[str] = []
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if size > self.max_output:
                raise TemplateError(f"chat template output exceeds {self.max_output} characters")
            out.append(chunk)
        return "".join(out)
