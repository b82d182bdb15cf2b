from herd.models.gemma3.model import Model

__all__ = ["Model"]
