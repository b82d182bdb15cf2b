"""A rerank request -> the token pairs a cross-encoder scores, and the scores -> results.

A pair is tokenized as Hugging Face's BERT pair template: `[CLS] query [SEP] document
[SEP]`, token type 0 up to and including the first [SEP], 1 after it. The rule when a pair
exceeds the model's context: the document is cut (its closing [SEP] kept), the query never
is; a query that leaves no room for one document token is refused (ContextLengthError, a
400). Hugging Face's tokenizer, as sentence-transformers' CrossEncoder calls it, cuts the
longer of the two instead; for the usual short query and long document both cut the same
tokens.

Scores are the classifier's raw logit (what llama.cpp's server returns as
`relevance_score`); `sigmoid(score)` is CrossEncoder.predict's default 0..1 score for a
one-label model. Both the library (`herd.api.LLM.rerank`) and the runner process use this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from herd.errors import BadRequestError, CapabilityError, ContextLengthError

if TYPE_CHECKING:
    from herd.runner.loaded import Loaded

Pair = tuple[list[int], list[int]]  # (token ids, token types)


def prepare_rerank(loaded: Loaded, query: str, documents: Sequence[str]) -> tuple[list[Pair], int]:
    """The pairs of `query` with each document, cut to the context by the rule above, and
    how many tokens they hold in all (the request's usage)."""
    if not loaded.is_rank:
        raise CapabilityError(f'"{loaded.name}" does not support rerank')
    if not documents:
        raise BadRequestError("documents must not be empty")
    n_ctx = loaded.context_length
    q = loaded.tokenize(query)  # [CLS] query [SEP]
    if len(q) + 2 > n_ctx:  # + one document token and its [SEP]
        raise ContextLengthError(
            f"the query ({len(q)} tokens with [CLS] and [SEP]) leaves no room for a document "
            f"in the context of {n_ctx} tokens"
        )
    sep, room = q[-1], n_ctx - len(q) - 1
    pairs: list[Pair] = []
    for doc in documents:
        body = loaded.tokenize(doc, add_special=False)[:room]
        pairs.append((q + body + [sep], [0] * len(q) + [1] * (len(body) + 1)))
    return pairs, sum(len(ids) for ids, _ in pairs)


def ranked(
    scores: Sequence[float],
    documents: Sequence[str],
    top_n: int | None = None,
    return_documents: bool = False,
) -> list[dict[str, object]]:
    """Results by score, best first (ties by index): `index`, `relevance_score` and, when
    asked, `document` as `{"text"}` (Jina's and Cohere's shape); the first `top_n`."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    out: list[dict[str, object]] = []
    for i in order[: len(order) if top_n is None else top_n]:
        item: dict[str, object] = {"index": i, "relevance_score": float(scores[i])}
        if return_documents:
            item["document"] = {"text": documents[i]}
        out.append(item)
    return out


def scores_of(out: np.ndarray) -> list[float]:
    """The first label's logit of each pair (a one-label cross-encoder has only that)."""
    return [float(x) for x in np.asarray(out, np.float32).reshape(len(out), -1)[:, 0]]
