from herd.models.llama.model import Model

__all__ = ["Model"]
