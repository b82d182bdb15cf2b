"""Thin neural-network modules over `herd.ml` ops (docs/ARCHITECTURE.md, "nn")."""

from herd.nn.attention import attention, query_rows
from herd.nn.conv import Conv2d, PatchEmbedding
from herd.nn.modules import Embedding, LayerNorm, Linear, RMSNorm, Stack
from herd.nn.weights import Weights

__all__ = [
    "Conv2d",
    "Embedding",
    "LayerNorm",
    "Linear",
    "PatchEmbedding",
    "RMSNorm",
    "Stack",
    "Weights",
    "attention",
    "query_rows",
]
