from herd.models.mllama.model import Model

__all__ = ["Model"]
