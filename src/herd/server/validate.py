"""Request fields of both APIs checked once, at the boundary, against the types Ollama's Go
structs (api.Message, api.Tool, api.ToolCall) and OpenAI's schema give them.

Whatever passes reaches the runner in the shapes its template data and pipeline expect;
anything else is a BadRequestError (a 400 in the API's own error shape) naming the field,
never a TypeError deeper down. Unknown keys are dropped, as Go's decoder ignores them.
Numbers were already refused at parsing when they are NaN, infinite or nested too deep
(herd.server.http.parse_json); sampling options are checked by herd.options.
"""

from __future__ import annotations

from typing import Any

from herd.errors import BadRequestError
from herd.options import INT32
from herd.server.images import check_images

MAX_TOKEN_ID = INT32 - 1  # the runner checks ids against its vocabulary; this bounds the type


def text(body: dict[str, Any], name: str, where: str = "") -> str | None:
    """An optional string field."""
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise BadRequestError(f"{where or name} must be a string")
    return value


def obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequestError(f"{where} must be an object")
    return value


def items(value: Any, where: str) -> list[Any]:
    """An optional list (None: empty)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequestError(f"{where} must be a list")
    return value


def strings(value: Any, where: str) -> list[str]:
    out = items(value, where)
    if not all(isinstance(s, str) for s in out):
        raise BadRequestError(f"{where} must be a list of strings")
    return out


def integer(value: Any, where: str, low: int = -INT32, high: int = INT32 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequestError(f"{where} must be an integer between {low} and {high}")
    return value


def number(body: dict[str, Any], name: str) -> float | None:
    """An optional JSON number (OpenAI's temperature, top_p, penalties): a string such as
    "NaN" is not one."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequestError(f"{name} must be a number")
    return value


def context(value: Any) -> list[int] | None:
    """/api/generate's `context`: token ids of an earlier answer."""
    if value is None:
        return None
    ids = items(value, "context")
    for i in ids:
        integer(i, "each context token id", 0, MAX_TOKEN_ID)
    return ids


def go_template(source: str) -> None:
    """A request's `template` must be a Go template, as Ollama takes it: herd's Go executor
    bounds every string it makes (herd.template.gotemplate), and a Jinja template here would
    be code from the request. TemplateError (400) when it does not parse."""
    from herd.template.ollama import Template

    if "{%" in source or "{#" in source:  # what herd.template.select reads as Jinja
        raise BadRequestError("template must be a Go template (text/template), not Jinja")
    Template(source)  # GoTemplateError, a TemplateError: the parse error, with its place


# A request's text beyond this many characters per token of its context cannot fit even in
# the longest tokens; tokenizing it would still cost the runner seconds per megabyte
CHARS_PER_TOKEN = 32
MIN_TEXT = 256 * 1024  # characters any request may send, whatever its context


def text_fits(payload: dict[str, Any], context_length: int) -> None:
    """400 when the text of a completion payload (prompt, suffix, system, messages'
    content and thinking) is far longer than its context could ever hold."""
    size = sum(len(payload.get(k) or "") for k in ("prompt", "suffix", "system"))
    for m in payload.get("messages") or ():
        size += len(m.get("content") or "") + len(m.get("thinking") or "")
    limit = max(MIN_TEXT, CHARS_PER_TOKEN * context_length)
    if size > limit:
        raise BadRequestError(
            f"the request's text ({size} characters) is far longer than the context of "
            f"{context_length} tokens can hold (limit {limit} characters)"
        )


# ---- Ollama --------------------------------------------------------------------------------
_MESSAGE_TEXT = ("thinking", "tool_name", "tool_call_id")


def ollama_message(m: Any, i: int = 0) -> dict[str, Any]:
    """api.Message: role, content, thinking, images (base64), tool_calls, tool_name."""
    if not isinstance(m, dict):
        raise BadRequestError("each message must be an object")
    role = m.get("role")
    if not isinstance(role, str) or not role:
        raise BadRequestError("message role is required")
    content = m.get("content")
    if content is not None and not isinstance(content, str):
        raise BadRequestError("message content must be a string")
    out: dict[str, Any] = {"role": role.lower(), "content": content or ""}
    for key in _MESSAGE_TEXT:
        value = text(m, key, f"messages[{i}].{key}")
        if value is not None:
            out[key] = value
    images = check_images(m.get("images"), f"messages[{i}].images")
    if images:
        out["images"] = images
    calls = [tool_call(c, f"messages[{i}].tool_calls[{j}]", i) for j, c in
             enumerate(items(m.get("tool_calls"), f"messages[{i}].tool_calls"))]  # fmt: skip
    if calls:
        out["tool_calls"] = calls
    return out


def tool_call(call: Any, where: str, i: int = 0, openai: bool = False) -> dict[str, Any]:
    """api.ToolCall {id, function: {index, name, arguments}}; OpenAI's arguments are a JSON
    string (parsed later), Ollama's an object."""
    call = obj(call, where)
    fn = obj(call.get("function") or {}, f"{where}.function")
    out_fn: dict[str, Any] = {"name": text(fn, "name", f"{where}.function.name") or ""}
    if fn.get("index") is not None:
        out_fn["index"] = integer(fn["index"], f"{where}.function.index", 0)
    args = fn.get("arguments")
    if args is not None:
        if not isinstance(args, dict) and not (openai and isinstance(args, str)):
            kind = "a JSON string or an object" if openai else "an object"
            raise BadRequestError(f"{where}.function.arguments must be {kind}")
        out_fn["arguments"] = args
    out: dict[str, Any] = {"function": out_fn}
    for key in ("id", "type"):
        value = text(call, key, f"{where}.{key}")
        if value is not None:
            out[key] = value
    return out


def tools(value: Any) -> list[dict[str, Any]] | None:
    """api.Tool: {type, items, function: {name, description, parameters}}, the parameters a
    JSON schema object whose `properties` are objects (the templates range over them)."""
    if value is None:
        return None
    out = []
    for i, t in enumerate(items(value, "tools")):
        where = f"tools[{i}]"
        t = obj(t, where)
        text(t, "type", f"{where}.type")
        fn = obj(t.get("function") or {}, f"{where}.function")
        text(fn, "name", f"{where}.function.name")
        text(fn, "description", f"{where}.function.description")
        params = fn.get("parameters")
        if params is not None:
            schema(params, f"{where}.function.parameters")
        out.append(t)
    return out


def schema(p: Any, where: str) -> None:
    """A tool's parameters or one property (api.ToolProperty), as the template data reads
    them (herd.template.ollama_data._property): nested iteratively, no recursion."""
    todo = [(p, where)]
    while todo:
        p, where = todo.pop()
        p = obj(p, where)
        kind = p.get("type")
        if (
            kind is not None
            and not isinstance(kind, str)
            and (not isinstance(kind, list) or not all(isinstance(k, str) for k in kind))
        ):
            raise BadRequestError(f"{where}.type must be a string or a list of strings")
        text(p, "description", f"{where}.description")
        strings(p.get("required"), f"{where}.required")
        items(p.get("enum"), f"{where}.enum")
        props = p.get("properties")
        if props is not None:
            for name, sub in obj(props, f"{where}.properties").items():
                todo.append((sub, f"{where}.properties.{name}"))
        for j, sub in enumerate(items(p.get("anyOf"), f"{where}.anyOf")):
            if isinstance(sub, dict):  # the template data skips the others
                todo.append((sub, f"{where}.anyOf[{j}]"))


# ---- OpenAI --------------------------------------------------------------------------------
def openai_message(m: Any, i: int) -> dict[str, Any]:
    """A chat message with its content left for the caller (text or parts): role, name,
    tool_calls (arguments as a JSON string), tool_call_id, reasoning."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise BadRequestError("each message needs a role")
    out: dict[str, Any] = {"role": m["role"].lower()}
    text(m, "name", f"{where}.name")  # checked, not kept: a user's name is no tool's
    for key in ("tool_call_id", "reasoning", "thinking"):
        value = text(m, key, f"{where}.{key}")
        if value is not None:
            out[key] = value
    calls = [tool_call(c, f"{where}.tool_calls[{j}]", i, openai=True) for j, c in
             enumerate(items(m.get("tool_calls"), f"{where}.tool_calls"))]  # fmt: skip
    if calls:
        out["tool_calls"] = calls
    return out


def include_usage(body: dict[str, Any]) -> bool:
    """stream_options.include_usage: a bool in an object."""
    options = body.get("stream_options")
    if options is None:
        return False
    value = obj(options, "stream_options").get("include_usage")
    if value is not None and not isinstance(value, bool):
        raise BadRequestError("stream_options.include_usage must be true or false")
    return bool(value)
