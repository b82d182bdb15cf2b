"""Rerank (cross-encoder) models, beside `Model`: one score per query-document pair.

A cross-encoder reads `[CLS] query [SEP] document [SEP]` as one sequence, its segments
told apart by token types (0 for the query part, 1 for the document part), and turns the
[CLS] state into scores through a classification head (llama.cpp's `cls` and
`cls.output` tensors, GGUF `pooling_type` 4, rank). Like an embedding model it has no
cache (`is_embedding`) and encodes whole sequences each call.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from herd.ml import Context, Tensor
from herd.models.base import Inputs

POOLING_RANK = 4  # GGUF `<arch>.pooling_type` of a reranker (llama.cpp's LLAMA_POOLING_TYPE_RANK)


@runtime_checkable
class Ranker(Protocol):
    n_labels: int  # scores per pair (the classifier's outputs); herd serves the first

    def rank(self, ctx: Context, inputs: Inputs, token_types: np.ndarray) -> Tensor:
        """(number of sequences, n_labels): the raw classifier logits of each sequence of
        the batch, in increasing sequence id order; `token_types` (T,) int32 per row."""
        ...
