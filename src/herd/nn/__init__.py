"""Thin neural-network modules over `herd.ml` ops (docs/ARCHITECTURE.md, "nn")."""

from herd.nn.attention import attention, query_rows
from herd.nn.modules import Embedding, LayerNorm, Linear, RMSNorm
from herd.nn.weights import Weights

__all__ = ["Embedding", "LayerNorm", "Linear", "RMSNorm", "Weights", "attention", "query_rows"]
