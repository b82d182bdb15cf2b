from herd.models.bert.model import Model

__all__ = ["Model"]
