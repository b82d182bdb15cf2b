"""OCI distribution client: pull and push models with Ollama's registry protocol."""

from herd.registry.client import Client, Options
from herd.registry.download import pull, registry_puller
from herd.registry.upload import push

__all__ = ["Client", "Options", "pull", "push", "registry_puller"]
