"""The CLI as a client of `herd serve` (like Ollama's CLI of its server).

`connect(start=False)` finds a running server at HERD_HOST (else OLLAMA_HOST, else
127.0.0.1:11434); `connect(start=True)` starts `herd serve` in the background first when
none answers (its log goes to ~/.herd/logs/server.log), which is what `herd run` does.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from herd import envconfig
from herd.errors import HerdError, ModelNotFoundError, OptionError
from herd.store.facts import ShowFacts, TensorFacts
from herd.store.wheels import Progress

if TYPE_CHECKING:
    from herd.store.ggufinfo import GGUFFacts


class ServerError(HerdError):
    """The server answered with an error."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, text: str) -> HerdError:
    try:
        message = json.loads(text).get("error", text)
    except (ValueError, AttributeError):
        message = text
    if isinstance(message, dict):  # OpenAI's shape
        message = message.get("message", str(message))
    message = str(message) or f"HTTP {status}"
    if status == 404:
        return ModelNotFoundError(message)
    if status == 400 and "option" in message:
        return OptionError(message)
    return ServerError(message, status)


class Client:
    def __init__(self, base_url: str | None = None, api_key: str | None = None) -> None:
        self.base_url = base_url or envconfig.host().base_url
        key = envconfig.api_key() if api_key is None else api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(None, connect=5.0)
        )

    def heartbeat(self) -> bool:
        try:
            return self.http.head("/", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        r = self.http.request(method, path, json=body)
        if r.status_code >= 400:
            raise _error(r.status_code, r.text)
        return r.json() if r.content else None

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """NDJSON lines; an `{"error"}` line raises. Closing the iterator drops the
        connection, which cancels the request on the server."""
        with self.http.stream("POST", path, json=body) as r:
            if r.status_code >= 400:
                raise _error(r.status_code, r.read().decode("utf-8", "replace"))
            for line in r.iter_lines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if "error" in item:
                    raise ServerError(str(item["error"]), r.status_code)
                yield item

    def pull(self, model: str, progress: Progress, insecure: bool = False) -> None:
        for item in self.stream("/api/pull", {"model": model, "insecure": insecure}):
            progress(
                item.get("status", ""), item.get("digest"), item.get("total"), item.get("completed")
            )

    def close(self) -> None:
        self.http.close()


def start_server_background(env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`herd serve` detached from this terminal, logging to ~/.herd/logs/server.log."""
    log_dir = envconfig.log_dir()
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "server.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "herd", "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def connect(start: bool = False, wait_s: float = 30.0) -> Client | None:
    """A client of the running server; None if there is none (and `start` is False)."""
    client = Client()
    if client.heartbeat():
        return client
    if not start:
        client.close()
        return None
    proc = start_server_background()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if client.heartbeat():
            return client
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    client.close()
    raise HerdError(
        f"could not start herd serve at {envconfig.host().base_url}; see "
        f"{envconfig.log_dir() / 'server.log'}"
    )


class RemoteLLM:
    """The CLI's `LLM` (generate/chat/info) answered by the server."""

    def __init__(self, client: Client, model: str, keep_alive: str | None = None) -> None:
        self.client, self.model, self.keep_alive = client, model, keep_alive

    def _body(self, **fields: Any) -> dict[str, Any]:
        body = {"model": self.model, **{k: v for k, v in fields.items() if v is not None}}
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        return body

    def generate(
        self,
        prompt: str,
        *,
        system: str | None = None,
        options: dict[str, Any] | None = None,
        raw: bool = False,
        stream: bool = False,
        format: str | dict[str, Any] | None = None,
        think: bool | str | None = None,
        images: list[bytes] | None = None,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        body = self._body(
            prompt=prompt,
            system=system,
            options=options,
            raw=raw or None,
            format=format,
            think=think,
            images=_base64(images) or None,
        )
        return self._run("/api/generate", body, stream)

    def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        options: dict[str, Any] | None = None,
        stream: bool = False,
        tools: list[dict[str, Any]] | None = None,
        think: bool | str | None = None,
        format: str | dict[str, Any] | None = None,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        # the conversation keeps its images as bytes; the API takes them in base64
        sent = [{**m, "images": _base64(m["images"])} if m.get("images") else m for m in messages]
        body = self._body(messages=sent, options=options, tools=tools, think=think, format=format)
        return self._run("/api/chat", body, stream)

    def embed_text(
        self, text: str, truncate: bool | None = None, dimensions: int | None = None
    ) -> list[float]:
        """One input's vector from /api/embed."""
        body = self._body(input=text, truncate=truncate, dimensions=dimensions)
        result = self.client.request("POST", "/api/embed", body)
        vectors = (result or {}).get("embeddings") or []
        if not vectors:
            raise HerdError("no embeddings returned")
        return [float(v) for v in vectors[0]]

    def _run(
        self, path: str, body: dict[str, Any], stream: bool
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        if stream:
            return self.client.stream(path, body)
        result: dict[str, Any] = self.client.request("POST", path, {**body, "stream": False})
        return result

    def info(self) -> dict[str, Any]:
        show = self.client.request("POST", "/api/show", {"model": self.model})
        info = show.get("model_info") or {}
        arch = info.get("general.architecture", "")
        return {
            "architecture": arch,
            "parameters": info.get("general.parameter_count"),
            "context_length": info.get(f"{arch}.context_length"),
            "embedding_length": info.get(f"{arch}.embedding_length"),
            "quantization": (show.get("details") or {}).get("quantization_level"),
            "template": show.get("template"),
            "capabilities": show.get("capabilities") or [],
        }


def _base64(images: list[bytes] | None) -> list[str]:
    return [base64.b64encode(data).decode("ascii") for data in images or []]


def remote_llm(
    client: Client, model: str, progress: Progress, keep_alive: str | None = None
) -> RemoteLLM:
    """Like `ollama run`: show the model, pulling it through the server when missing."""
    try:
        client.request("POST", "/api/show", {"model": model})
    except ModelNotFoundError:
        client.pull(model, progress)
    return RemoteLLM(client, model, keep_alive)


# ---- `herd show` from /api/show -------------------------------------------------------------
def parse_parameters(text: str) -> dict[str, Any]:
    """/api/show's `parameters` lines (`key value`, values as Go's %#v) back to a dict."""
    params: dict[str, Any] = {}
    for line in text.splitlines():
        key, _, raw = line.strip().partition(" ")
        if not key:
            continue
        raw = raw.strip()
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        if key in params:
            old = params[key]
            params[key] = (old if isinstance(old, list) else [old]) + [value]
        elif key == "stop":
            params[key] = [value]
        else:
            params[key] = value
    return params


def show_facts(resp: dict[str, Any], name: str) -> ShowFacts:
    """The store's ShowFacts, rebuilt from the server's ShowResponse."""
    from herd.store.ggufinfo import GGUFFacts

    info = {k: v for k, v in (resp.get("model_info") or {}).items() if v is not None}
    arch = str(info.get("general.architecture", ""))
    details = resp.get("details") or {}
    template = resp.get("template") or None
    gguf = GGUFFacts(
        architecture=arch,
        parameter_count=int(info.get("general.parameter_count") or 0),
        context_length=info.get(f"{arch}.context_length"),
        embedding_length=info.get(f"{arch}.embedding_length"),
        file_type=str(details.get("quantization_level", "")),
        chat_template=info.get("tokenizer.chat_template"),
        kv=info,
    )
    tensors = [
        TensorFacts(t["name"], t["type"], tuple(reversed(t["shape"])))
        for t in resp.get("tensors") or []
    ]
    license = [resp["license"]] if resp.get("license") else []
    return ShowFacts(
        name=name,
        model_path=Path(""),
        gguf=gguf,
        tensors=tensors,
        template=template,
        system=resp.get("system") or None,
        params=parse_parameters(resp.get("parameters") or ""),
        license=license,
        projector=_projector(resp.get("projector_info")),
        messages=[m for m in resp.get("messages") or [] if isinstance(m, dict)],
    )


def _projector(info: Any) -> GGUFFacts | None:
    """The projector's facts from /api/show's `projector_info` (None: no vision part)."""
    from herd.store.ggufinfo import GGUFFacts

    if not isinstance(info, dict) or not info:
        return None
    arch = str(info.get("general.architecture", ""))
    kv = {k: v for k, v in info.items() if v is not None}
    count = int(info.get("general.parameter_count") or 0)
    width = info.get(f"{arch}.vision.embedding_length")
    return GGUFFacts(arch, count, None, width, "", None, kv)
