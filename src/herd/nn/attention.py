"""Scaled dot-product attention over the KV cache."""

from __future__ import annotations

from typing import Protocol, cast

from herd.kvcache.attend import Keys
from herd.ml import FusedAttention, Tensor


class KVCache(Protocol):
    def put(self, k: Tensor, v: Tensor) -> None: ...
    def get(self) -> tuple[Tensor, Tensor, Tensor]: ...
    def prefix(self) -> tuple[Tensor, Tensor, Tensor] | None: ...
    def blocks(self) -> list[tuple[int, int, Keys, Keys, Tensor]]: ...


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    cache: KVCache | None,
    mask: Tensor | None = None,
    rows: Tensor | None = None,
    fused: bool | None = None,
) -> Tensor:
    """q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, Dv) -> (T, Hq * Dv), or (N, Hq * Dv) for
    the N batch `rows` given.

    With a cache, k/v are stored first and attention reads the whole history (S cells)
    with the cache's mask; without one, `mask` (T, T) or None (bidirectional) applies.
    `rows` (I32 indices into the batch): q holds only these tokens' queries, (N, Hq, D)
    (see `query_rows`), and only they attend. The last layer needs no more than the rows
    whose logits are wanted, and every token's keys and values are stored all the same: a
    prompt's last layer then projects and attends one query instead of all.
    A cache may also hand a long batch's queries over in blocks (`blocks()`), each to
    attend over only the cells its rows may see, and several decoding sequences as one
    block with a leading axis of sequences (keys (N, S, Hkv, D)), which the backend's
    fused attention takes in one op (`CacheConfig.streams`). `fused=True`: the backend's fused
    attention whatever it was opened with (`FusedAttention`): vision encoders, whose
    thousands of patches would otherwise make a score matrix of a GiB.
    A cache's sequences may share a prefix held once in another part of it (`prefix()`):
    its keys and values are a second piece, attended with the rest as one softmax.
    """
    blocks: list[tuple[int, int, Keys, Keys, Tensor]] = []
    prefix = None
    if cache is not None:
        cache.put(k, v)
        k, v, mask = cache.get()
        prefix = cache.prefix()
        if rows is None:
            blocks = cache.blocks()
    if rows is not None:
        assert q.shape[0] == rows.shape[0], f"q has {q.shape[0]} rows for {rows.shape[0]}"
        mask = mask.get_rows(rows) if mask is not None else None
        if prefix is not None:
            prefix = (prefix[0], prefix[1], prefix[2].get_rows(rows))
    if not blocks:
        if prefix is not None:
            assert mask is not None
            joint = prefix[2].concat(mask, axis=1)  # the prefix's columns first
            return _attend_pieces(q, (prefix[0], k), (prefix[1], v), joint, scale)
        return _attend(q, k, v, mask, scale, fused)
    # each block of queries over only the cells its rows see: the causal triangle's upper
    # half is neither multiplied nor softmaxed (the masked cells it skips weigh exactly 0)
    parts = []
    for a, b, kb, vb, m in blocks:
        qb = q.slice(0, a, b)
        own = kb[1] if isinstance(kb, tuple) else kb
        if len(own.shape) == 4:  # N sequences' rows, each over its own keys
            parts.append(_attend_streams(qb, kb, vb, m, scale))
        elif isinstance(kb, tuple) and isinstance(vb, tuple):
            parts.append(_attend_pieces(qb, kb, vb, m, scale))
        else:
            assert not isinstance(kb, tuple) and not isinstance(vb, tuple)
            parts.append(_attend(qb, kb, vb, m, scale))
    return parts[0].concat_rows(parts[1:]) if len(parts) > 1 else parts[0]


def query_rows(x: Tensor, pos: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """The inputs (T, D) and positions (T,) that the queries are made from: the batch's, or
    only those of `rows` for `attention(..., rows=rows)`."""
    if rows is None:
        return x, pos
    n = rows.shape[0]
    return x.get_rows(rows), pos.reshape(pos.shape[0], 1).get_rows(rows).reshape(n)


def _attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, fused: bool | None = None
) -> Tensor:
    # the backend's own attention where its tensors have one; asked of the class, which
    # Python caches, not the instance (a protocol isinstance walks its members: ~8 us)
    if issubclass(type(q), FusedAttention):
        out = cast(FusedAttention, q).scaled_dot_product_attention(k, v, mask, scale, fused)
        if out is not None:
            return out
    t, hq, d = q.shape
    qh = q.permute(1, 0, 2)  # (Hq, T, D)
    kh = k.permute(1, 0, 2)  # (Hkv, S, D)
    vh = v.permute(1, 2, 0)  # (Hkv, Dv, S): matmul_t makes it contiguous if it must
    probs = qh.matmul_t(kh).softmax(mask, scale)  # (Hq, T, S)
    out = probs.matmul_t(vh)  # (Hq, T, Dv)
    return out.permute(1, 0, 2).contiguous().reshape(t, hq * vh.shape[1])


def _attend_pieces(
    q: Tensor, k: tuple[Tensor, Tensor], v: tuple[Tensor, Tensor], mask: Tensor, scale: float
) -> Tensor:
    """q (T, Hq, D) over two pieces of keys (S1, Hkv, D), (S2, Hkv, D) and values, mask
    (T, S1 + S2): what one attention over their concatenation gives. Whichever has fewer
    bytes is put together (F32 scores against an F16 cache's keys and values): the
    pieces' keys and values, then one attention (a block of a prompt's rows under a
    shared prefix), or the scores over each piece, one softmax over both and each piece's
    values weighed by its share (a pass's last layer, its few output rows over every
    sequence's cells). A wave of 8 prompts of 40 tokens under a shared 200-token prefix
    (SmolLM2, 2 threads) computed in 507 ms with joined scores, 501 ms with joined keys
    and values, and 489 ms over each one's own copy of the prefix."""
    t, hq, _ = q.shape
    _, hkv, d = k[0].shape
    if 2 * t * hq >= hkv * (d + v[0].shape[2]):
        return _attend(q, k[0].concat(k[1], axis=0), v[0].concat(v[1], axis=0), mask, scale)
    qh = q.permute(1, 0, 2)  # (Hq, T, D)
    scores = [qh.matmul_t(piece.permute(1, 0, 2)) for piece in k]  # (Hq, T, S_i)
    probs = scores[0].concat(scores[1], axis=2).softmax(mask, scale)
    n = k[0].shape[0]
    outs = [
        probs.slice(2, a, b).matmul_t(piece.permute(1, 2, 0))  # (Hq, T, Dv)
        for (a, b), piece in zip(((0, n), (n, n + k[1].shape[0])), v, strict=True)
    ]
    out = outs[0].add(outs[1])
    return out.permute(1, 0, 2).contiguous().reshape(t, hq * v[0].shape[2])


def _attend_streams(q: Tensor, k: Keys, v: Keys, mask: Tensor, scale: float) -> Tensor:
    """q (N * T, Hq, D), each sequence's T rows over its own k (N, S, Hkv, D), v (N, S,
    Hkv, Dv), mask (N, T, S): in one op where the backend's fused attention takes the
    sequences' axis (`CacheConfig.streams`), else one attention per sequence. k and v
    may be (a prefix's (P, Hkv, D) that every sequence attends, their own): mask then
    (N, T, P + S)."""
    prefix = None
    if isinstance(k, tuple) and isinstance(v, tuple):
        prefix, k, v = (k[0], v[0]), k[1], v[1]
    assert not isinstance(k, tuple) and not isinstance(v, tuple)
    n, (rows, hq, d) = k.shape[0], q.shape
    t = rows // n
    if issubclass(type(q), FusedAttention):
        out = cast(FusedAttention, q.reshape(n, t, hq, d)).scaled_dot_product_attention(
            k, v, mask, scale, prefix=prefix
        )
        if out is not None:
            return out
    parts = []
    for i in range(n):
        ki, vi = (x.slice(0, i, i + 1).reshape(*x.shape[1:]) for x in (k, v))
        mi = mask.slice(0, i, i + 1).reshape(*mask.shape[1:])
        qi = q.slice(0, i * t, (i + 1) * t)
        if prefix is None:
            parts.append(_attend(qi, ki, vi, mi, scale))
        else:
            parts.append(_attend_pieces(qi, (prefix[0], ki), (prefix[1], vi), mi, scale))
    return parts[0].concat_rows(parts[1:])
