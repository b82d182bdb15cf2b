from herd.models.qwen2.model import Model

__all__ = ["Model"]
