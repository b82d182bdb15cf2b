"""Log-probabilities of sampled tokens, as Ollama reports them (over the raw logits)."""

from __future__ import annotations

from typing import Any

import numpy as np

from herd.sample.transforms import Logits, _largest
from herd.tokenizer import Tokenizer


def logprobs(logits: Logits, token: int, top_n: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """Log-softmax of the raw logits (before penalties or temperature): the log-probability
    of `token`, and the `top_n` most likely ids with theirs, most likely first."""
    x = logits
    m = float(np.max(x))
    # exp in float32 (half the memory traffic of float64), summed in float64.
    lse = m + float(np.log(np.exp(x - np.float32(m)).sum(dtype=np.float64)))
    top: list[tuple[int, float]] = []
    n = x.shape[0]
    if top_n > 0:
        k = min(top_n, n)
        ids = _largest(x, k) if k < n else np.arange(n, dtype=np.intp)
        ids = ids[np.argsort(-x[ids], kind="stable")]
        top = [(int(i), float(x[i]) - lse) for i in ids]
    return float(x[token]) - lse, top


def api_logprob(tokenizer: Tokenizer, logits: Logits, token: int, top_n: int) -> dict[str, Any]:
    """Ollama's api.Logprob of `token` ({token, logprob, bytes, top_logprobs}), over the
    raw logits row."""

    def entry(id: int, value: float) -> dict[str, Any]:
        raw = tokenizer.piece(id, special=True)
        out: dict[str, Any] = {"token": raw.decode("utf-8", errors="replace"), "logprob": value}
        if raw:
            out["bytes"] = list(raw)
        return out

    value, top = logprobs(logits, token, top_n)
    out = entry(token, value)
    if top:
        out["top_logprobs"] = [entry(i, v) for i, v in top]
    return out
