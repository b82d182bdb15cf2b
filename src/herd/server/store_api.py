"""Requests that change the store: `/api/create`, `/api/push`, `/api/pull`, with Ollama's
progress streams.

A create request is Ollama's CreateRequest: the model comes from `from` (a model name) or
from `files` ({file name: digest} of blobs uploaded first with `POST /api/blobs/:digest`),
plus `adapters`, `draft_files` (a DRAFT model's files) and `draft_quantize`, `template`,
`system`, `license`, `parameters`, `messages`, `quantize`. It becomes the Modelfile it
stands for and goes to `herd.store.create`, the code behind `herd create`. The uploaded
files are staged as links in a temporary folder inside the store, so FROM names a GGUF
file or a Hugging Face folder as it would on the command line; a GGUF blob is used in
place, never copied.

Everything a client can get wrong (names, digests, missing blobs, file types, template,
parameter types, quantization type) is checked before the stream starts, so it answers
400 with Ollama's words instead of a 200 whose last line is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from herd.errors import (
    BadRequestError,
    ConvertError,
    DownloadError,
    HerdError,
    ModelfileError,
    TemplateError,
)
from herd.modelfile import DEPRECATED, Command, Modelfile
from herd.options import OPTIONS
from herd.server.http import JSON, first_item, flag, ndjson
from herd.store import Store, names, pull
from herd.store.layout import parse_digest
from herd.store.wheels import Progress

Work = Callable[[Progress], object]


# ---- progress streams --------------------------------------------------------------------
async def progress_response(request: Request, body: dict[str, Any], work: Work) -> Response:
    """Run `work(progress)` on a thread; stream its ProgressResponses as NDJSON (or, with
    `stream: false`, answer the last status). An error before the first line gets its own
    status code, as Ollama's streamResponse does."""
    streaming = flag(body, "stream", True)  # checked before any work starts
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    gone: list[bool] = []  # the stream ended: a client that left stops the work

    def progress(status: str, digest: str | None, total: int | None, completed: int | None) -> None:
        if gone:  # raised in the work's thread: a pull stops at its next chunk
            raise DownloadError("stopped: the client disconnected")
        item: dict[str, Any] = {"status": status}
        if digest and digest.startswith("sha256:"):  # not server paths ("file:...")
            item["digest"] = digest
        if total:
            item.update(total=total, completed=completed or 0)
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def run() -> None:
        try:
            work(progress)
        except BaseException as e:
            loop.call_soon_threadsafe(queue.put_nowait, e)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    loop.run_in_executor(None, run)

    async def items() -> AsyncIterator[dict[str, Any]]:
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item if isinstance(item, HerdError) else DownloadError(str(item))
                yield item
        finally:
            gone.append(True)

    stream = items()
    if streaming:
        first = await first_item(request, stream)
        return ndjson(first, stream, lambda x: x)
    last: dict[str, Any] = {}
    async for item in stream:
        last = item
    return JSON({"status": last.get("status", "success")})


def _registry_puller(insecure: bool) -> Any:
    """The OCI registry client for names outside the built-in catalog, when installed."""
    try:
        from herd.registry import Options, registry_puller
    except ImportError:
        return None
    return registry_puller(Options(insecure=insecure))


def _model_name(body: dict[str, Any]) -> str:
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequestError("model is required")
    names.parse(name)  # InvalidNameError: 400
    return name


# ---- the endpoints -------------------------------------------------------------------------
async def pull_model(request: Request, body: dict[str, Any], store: Store) -> Response:
    name = _model_name(body)
    registry = _registry_puller(flag(body, "insecure", False))
    return await progress_response(
        request, body, lambda report: pull(name, store=store, progress=report, registry=registry)
    )


async def push_model(request: Request, body: dict[str, Any], store: Store) -> Response:
    from herd.registry import Options, push

    name = _model_name(body)
    store.resolve(name)  # ModelNotFoundError: 404 before anything streams
    options = Options(insecure=flag(body, "insecure", False))
    return await progress_response(request, body, lambda report: push(store, name, options, report))


async def create_model(request: Request, body: dict[str, Any], store: Store) -> Response:
    from herd.store.create import create

    name = _model_name(body)
    flag(body, "stream", True)  # a 400 before anything is staged
    store.root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".herd-create-", dir=store.root))
    try:
        modelfile, quantize = recipe(store, body, staging)
        draft_quantize = _draft_quantize(body)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    registry = _registry_puller(False)

    def work(report: Progress) -> None:
        try:
            create(
                store,
                name,
                modelfile,
                base_dir=staging / "empty",
                quantize_to=quantize,
                progress=report,
                pull=lambda s, n, r: pull(n, store=s, progress=r, registry=registry),
                draft_quantize=draft_quantize,
            )
        except ModelfileError as e:
            raise BadRequestError(e.message) from None
        except (TemplateError, ConvertError) as e:  # ConvertError: a folder herd can't read
            raise BadRequestError(str(e)) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    return await progress_response(request, body, work)


# ---- CreateRequest -> Modelfile ---------------------------------------------------------------
def recipe(store: Store, body: dict[str, Any], staging: Path) -> tuple[Modelfile, str | None]:
    """The Modelfile a CreateRequest stands for, and its quantization type; files are
    linked under `staging`. BadRequestError (or TemplateError, InvalidNameError) for
    anything wrong."""
    commands: list[Command] = []

    def add(directive: str, args: str, name: str | None = None, role: str = "") -> None:
        commands.append(Command(name or directive, args, 0, 0, directive, role))

    (staging / "empty").mkdir()  # FROM names resolve against it: never a server path
    source, files = body.get("from"), _digests(body, "files")
    if source not in (None, ""):
        if not isinstance(source, str):
            raise BadRequestError("from must be a model name")
        try:
            names.parse(source)
        except HerdError:
            raise BadRequestError("invalid model name") from None
        add("from", source, "model")
    elif files is not None:
        add("from", str(_stage(store, files, staging / "model", "model")), "model")
    else:
        raise BadRequestError("neither 'from' or 'files' was specified")
    adapters = _digests(body, "adapters")
    if adapters:
        add("adapter", str(_stage(store, adapters, staging / "adapter", "adapter")))
    drafts = _digests(body, "draft_files")  # Ollama's DRAFT: a GGUF or a Hugging Face folder
    if drafts:
        add("draft", str(_stage(store, drafts, staging / "draft", "draft")))

    template = _string(body, "template")
    if template is not None:
        from herd.server.validate import go_template

        # TemplateError: 400, before anything is written; Go only, as Ollama takes it (a
        # Jinja template from a request would be code the request runs in the sandbox)
        go_template(template)
        add("template", template)
    system = _string(body, "system")
    if system is not None:
        add("system", system)
    licenses = body.get("license")
    licenses = [licenses] if isinstance(licenses, str) else licenses or []
    if not isinstance(licenses, list) or not all(isinstance(t, str) for t in licenses):
        raise BadRequestError("license must be a string or a list of strings")
    for text in licenses:
        add("license", text)
    params = body.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise BadRequestError("parameters must be an object")
    for key, value in (params or {}).items():
        for text in _parameter_texts(key, value):
            add("parameter", text, key)
    messages = body.get("messages")
    if messages is not None and not isinstance(messages, list):
        raise BadRequestError("messages must be a list")
    for m in messages or []:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content", ""), str)
        ):
            raise BadRequestError("each message needs a role and a string content")
        add("message", m.get("content") or "", "message", m["role"].lower())
    for key in ("renderer", "parser", "requires"):
        value = _string(body, key)
        if value:
            add(key, value)

    modelfile = Modelfile(commands, path="request")
    try:
        modelfile.parameters  # noqa: B018 - typed check of every value
        modelfile.requires  # noqa: B018
    except ModelfileError as e:
        raise BadRequestError(e.message) from None
    quantize = body.get("quantize") or body.get("quantization")
    if quantize is not None:
        from herd.store.quantize import parse_file_type

        if not isinstance(quantize, str):
            raise BadRequestError("quantize must be a string")
        try:
            quantize = parse_file_type(quantize)
        except HerdError as e:
            raise BadRequestError(str(e)) from None
    return modelfile, quantize


def _draft_quantize(body: dict[str, Any]) -> str | None:
    """CreateRequest's `draft_quantize` (the draft layer's type), checked up front."""
    value = body.get("draft_quantize")
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise BadRequestError("draft_quantize must be a string")
    if not body.get("draft_files"):
        raise BadRequestError("--draft-quantize requires a DRAFT model")  # Ollama's words
    from herd.store.quantize import parse_file_type

    try:
        return parse_file_type(value)
    except HerdError as e:
        raise BadRequestError(str(e)) from None


def _string(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequestError(f"{key} must be a string")
    return value


def _digests(body: dict[str, Any], key: str) -> dict[str, str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequestError(f"{key} must be an object of file names and digests")
    for name, digest in value.items():
        if not _valid_path(name):
            raise BadRequestError("file path must be relative")
        if not isinstance(digest, str) or not digest:
            raise BadRequestError("invalid digest format")
        try:
            parse_digest(digest)
        except HerdError:
            raise BadRequestError("invalid digest format") from None
    return value


def _valid_path(name: Any) -> bool:
    """Go's fs.ValidPath: relative, slash-separated, no empty, `.` or `..` element."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _stage(store: Store, files: dict[str, str], folder: Path, what: str) -> Path:
    """Link the uploaded blobs under `folder` by their file names; the GGUF file, or the
    folder itself when it is a Hugging Face model (safetensors)."""
    if not files:
        raise BadRequestError("no files provided to convert")
    blobs: dict[str, Path] = {}
    for name, digest in files.items():
        blob = store.blob_path(digest)
        if not blob.is_file():
            raise BadRequestError(
                f"blob {digest} not found: upload it with POST /api/blobs/{digest} first"
            )
        link = folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
        blobs[name] = blob
    if any(n.endswith(".safetensors") for n in files):
        if what == "adapter" and "adapter_config.json" not in files:
            raise BadRequestError(
                "a safetensors adapter needs its adapter_config.json (a PEFT LoRA folder)"
            )
        return folder  # a Hugging Face model, or a PEFT adapter create converts
    ggufs = [n for n, blob in blobs.items() if n.endswith(".gguf") or _is_gguf(blob)]
    if not ggufs:
        raise BadRequestError("supplied file was not in GGUF format")
    if what == "model" and len(ggufs) == 2 and _model_and_projector(folder, ggufs):
        return folder  # llama.cpp's two-file layout: create tells the two apart
    if len(ggufs) > 1:
        raise BadRequestError(
            "only one adapter is currently supported"
            if what == "adapter"
            else "only one GGUF file per model is supported"
        )
    return folder / ggufs[0]


def _model_and_projector(folder: Path, names: list[str]) -> bool:
    """Two GGUFs, staged side by side, of which one is a projector (`clip`)."""
    from herd.gguf import open_gguf

    if not all(n.endswith(".gguf") and "/" not in n for n in names):
        return False
    with contextlib.suppress(HerdError):
        archs = [open_gguf(folder / n).kv.get("general.architecture") for n in names]
        return archs.count("clip") == 1
    return False


def _is_gguf(path: Path) -> bool:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read(4) == b"GGUF"
    return False


def _parameter_texts(key: Any, value: Any) -> list[str]:
    """A JSON parameter value as the Modelfile text(s) it stands for (`stop` may be a list)."""
    if not isinstance(key, str) or key not in OPTIONS and key not in DEPRECATED:
        raise BadRequestError(f"unknown parameter '{key}'")
    if key in DEPRECATED:
        return []
    values = value if isinstance(value, list) and OPTIONS[key].type is tuple else [value]
    out = []
    for v in values:
        if isinstance(v, bool):
            out.append("true" if v else "false")
        elif isinstance(v, float) and OPTIONS[key].type is int and v.is_integer():
            out.append(str(int(v)))
        elif isinstance(v, int | float | str):
            out.append(str(v))
        else:
            raise BadRequestError(f"invalid value {v!r} for parameter '{key}'")
    return out
