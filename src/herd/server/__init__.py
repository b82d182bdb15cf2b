"""`herd serve`: Ollama's HTTP API and OpenAI's, a scheduler, runner child processes."""

from herd.server.app import Settings, create_app, serve

__all__ = ["Settings", "create_app", "serve"]
