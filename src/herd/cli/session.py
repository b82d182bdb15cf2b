"""Where the REPL's `/load`, `/save`, `/list` and `/show` go: the running server (as
Ollama's CLI does, through /api/show, /api/create, /api/tags) or, without one, the store
and engine in this process. Both save through the same create path: the CreateRequest
`/save` sends is turned into a Modelfile by the server's own `recipe`."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from herd.cli.client import Client, remote_llm, show_facts
from herd.cli.env import LLM
from herd.cli.format import human_bytes, human_time, table
from herd.store import Store
from herd.store.facts import ShowFacts, load_facts
from herd.store.wheels import Progress


class Session(Protocol):
    def load(self, model: str) -> LLM: ...

    def facts(self, model: str) -> ShowFacts: ...

    def save(self, request: dict[str, Any]) -> None:
        """Create a model from an Ollama CreateRequest (`model`, `from`, `system`, ...)."""
        ...

    def list(self) -> str: ...


def model_table(client: Client | None) -> str:
    """`herd list`'s table, from the server when one runs, else from the store."""
    from herd.cli.server_cmds import remote_models

    rows = [["NAME", "ID", "SIZE", "MODIFIED"]]
    for m in remote_models(client) if client is not None else Store().list():
        rows.append([m.name, m.digest[:12], human_bytes(m.size), human_time(m.modified)])
    return table(rows)


class RemoteSession:
    def __init__(
        self, client: Client, progress: Callable[[], Progress], keep_alive: str | None = None
    ) -> None:
        self.client, self.progress, self.keep_alive = client, progress, keep_alive

    def load(self, model: str) -> LLM:
        return remote_llm(self.client, model, self.progress(), self.keep_alive)

    def facts(self, model: str) -> ShowFacts:
        return show_facts(self.client.request("POST", "/api/show", {"model": model}), model)

    def save(self, request: dict[str, Any]) -> None:
        self.client.request("POST", "/api/create", {**request, "stream": False})

    def list(self) -> str:
        return model_table(self.client)


class LocalSession:
    def __init__(self, load: Callable[[str], LLM], store: Store | None = None) -> None:
        self._load, self.store = load, store or Store()

    def load(self, model: str) -> LLM:
        return self._load(model)

    def facts(self, model: str) -> ShowFacts:
        return load_facts(model, self.store)

    def save(self, request: dict[str, Any]) -> None:
        from herd.server.store_api import recipe
        from herd.store.create import create

        with tempfile.TemporaryDirectory(prefix="herd-save-") as tmp:
            modelfile, _ = recipe(self.store, request, Path(tmp))
            create(self.store, request["model"], modelfile, base_dir=Path(tmp) / "empty")

    def list(self) -> str:
        return model_table(None)
