from herd.models.qwen3.model import Model

__all__ = ["Model"]
