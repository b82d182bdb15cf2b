"""OCI distribution client: pull and push models with Ollama's registry protocol."""

from herd.registry.client import Client, Options
from herd.registry.transfer import pull, push, registry_puller

__all__ = ["Client", "Options", "pull", "push", "registry_puller"]
