"""Jinja chat templates (`tokenizer.chat_template`), rendered as transformers renders them.

Templates come from model files, so they are untrusted code: they run in Jinja's immutable
sandbox, with bounds on output size and on `range` iterations, and every operation that can
make a string or list far larger than its inputs (`*`, `**`, `+`, `~`, `%`, str.format and
the padding, replacing and joining methods and filters, `tojson` with an indent, `lipsum`)
checks its result's size against MAX_OUTPUT before it allocates anything. Every failure
becomes a `TemplateError` that names the template line.
"""

from __future__ import annotations

import functools
import json
import operator
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
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


def _too_large(what: str, size: int) -> None:
    if size > MAX_OUTPUT:
        raise jinja2.exceptions.SecurityError(
            f"{what} result too large ({size} characters or items; the limit is {MAX_OUTPUT})"
        )


def _size(x: Any) -> int | None:
    return len(x) if isinstance(x, str | list | tuple) else None


_NUMBER = re.compile(r"\d+")


def _check_format(fmt: str, values: Any) -> None:
    """`%` and str.format: a width or precision in the format, or one taken from the values
    (`%*s`, `{:{w}}`), can ask for any size."""
    widths = [int(n) for n in _NUMBER.findall(fmt) if len(n) <= 12]
    if any(len(n) > 12 for n in _NUMBER.findall(fmt)):
        widths.append(MAX_OUTPUT + 1)
    if "*" in fmt or re.search(r"\{[^{}]*\{", fmt):
        items = values.values() if isinstance(values, dict) else values
        items = items if isinstance(items, list | tuple) or hasattr(items, "__iter__") else ()
        widths += [v for v in items if isinstance(v, int)]
    _too_large("format", len(fmt) + max(widths, default=0))


def _string_method(s: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The size a str method's result can reach, checked; join's iterable made a list."""
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        _too_large(name, args[0])
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            _too_large(name, len(s) + s.count("\t") * tab)
    elif name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        old, new = args[:2]
        n = s.count(old) if old else len(s) + 1
        _too_large(name, len(s) + n * max(0, len(new) - len(old)))
    elif name == "join" and args:
        parts = list(args[0])
        _too_large(name, len(s) * max(0, len(parts) - 1) + sum(len(str(p)) for p in parts))
        return (parts, *args[1:])
    return args


class _CodeGenerator(CodeGenerator):
    """`a ~ b` through the environment's checked join (jinja joins it inline)."""

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:  # noqa: N802 - jinja's
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, with every operation that can grow a string or list far beyond its
    inputs checked before it runs: `'x' * 10**10`, or a string doubled by `~` 40 times in a
    loop, would allocate gigabytes long before the output bound could see it."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _CodeGenerator

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) is not None and isinstance(n, int):
                    _too_large("repetition", len(seq) * n)
            return operator.mul(left, right)
        if op == "+":
            a, b = _size(left), _size(right)
            if a is not None and b is not None:
                _too_large("concatenation", a + b)
            return operator.add(left, right)
        if op == "%":
            if isinstance(left, str):
                _check_format(left, right if isinstance(right, tuple | dict) else (right,))
            return operator.mod(left, right)
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 4096:
            raise jinja2.exceptions.SecurityError("power result too large")
        return operator.pow(left, right)

    def checked_concat(self, parts: Sequence[Any]) -> str:
        strings = [str(p) for p in parts]
        _too_large("concatenation", sum(map(len, strings)))
        return "".join(strings)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            args = _string_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        run = super().wrap_str_format(value)
        if run is None:
            return None
        fmt = str(value.__self__)

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format(fmt, [*args, *kwargs.values()])
            return run(*args, **kwargs)

        return checked


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
    # Encoded in chunks so that a huge indent stops at the bound, not after allocating it.
    encoder = json.JSONEncoder(
        ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    out, size = [], 0
    for chunk in encoder.iterencode(x):
        size += len(chunk)
        _too_large("tojson", size)
        out.append(chunk)
    return "".join(out)


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


def _bounded_filters(env: _Environment) -> None:
    """Jinja's filters that pad, indent, replace, format or join, with their result's size
    checked first (each calls the str methods the sandbox checks, or is bounded here)."""
    filters = env.filters

    def center(value: Any, width: int = 80) -> str:
        _string_method(str(value), "center", (width,), {})
        return str(value).center(width)

    def replace(value: Any, old: Any, new: Any, count: int | None = None) -> str:
        s, old, new = str(value), str(old), str(new)
        _string_method(s, "replace", (old, new), {})
        return s.replace(old, new, -1 if count is None else count)

    def format_(value: Any, *args: Any, **kwargs: Any) -> str:
        if args and kwargs:
            raise jinja2.exceptions.FilterArgumentError("can't handle positional and keyword args")
        values = kwargs or args
        _check_format(str(value), values)
        return str(value) % values

    indent_filter = filters["indent"]

    @functools.wraps(indent_filter)
    def indent(s: Any, width: int | str = 4, *args: Any, **kwargs: Any) -> str:
        pad = width if isinstance(width, int) else len(str(width))
        _too_large("indent", len(str(s)) + (str(s).count("\n") + 1) * pad)
        return indent_filter(s, width, *args, **kwargs)

    join_filter = filters["join"]

    @functools.wraps(join_filter)  # keeps jinja's pass_eval_context mark
    def join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
        items = list(value)
        if attribute is not None:
            get = jinja2.filters.make_attrgetter(eval_ctx.environment, attribute)
            items = [get(x) for x in items]
        _string_method(str(d), "join", (items,), {})
        return join_filter(eval_ctx, items, d)

    lipsum = env.globals["lipsum"]

    def bounded_lipsum(n: int = 5, *args: Any, **kwargs: Any) -> Any:
        _too_large("lipsum", n * 100 * 20)  # at most 100 words of ~20 characters a paragraph
        return lipsum(n, *args, **kwargs)

    filters.update(center=center, replace=replace, format=format_, indent=indent, join=join)
    env.globals["lipsum"] = bounded_lipsum


def _environment() -> _Environment:
    # Same options, helpers and filters as transformers' apply_chat_template.
    env = _Environment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    _bounded_filters(env)
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
