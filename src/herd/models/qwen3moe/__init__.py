from herd.models.qwen3moe.model import Model

__all__ = ["Model"]
