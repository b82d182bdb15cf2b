"""Attention of GGMLTensor (nn's optional `FusedAttention`): composed from ggml's matmuls
and softmax (llama.cpp's CPU default, whose logits herd's goldens match) or fused by
ggml_flash_attn_ext; N decoding sequences at once over their own cells (streams)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from herd.ml.backends.ggml import _lib as L

if TYPE_CHECKING:
    from herd.ml.backends.ggml.context import GGMLContext
    from herd.ml.backends.ggml.tensor import GGMLTensor


def scaled_dot_product_attention(
    self: GGMLTensor, k: GGMLTensor, v: GGMLTensor, mask: GGMLTensor | None, scale: float,
    fused: bool | None = None, prefix: tuple[GGMLTensor, GGMLTensor] | None = None,
) -> GGMLTensor:  # fmt: skip
    """Fused attention (nn's optional capability): q=self (T, Hq, D), k (S, Hkv, D),
    v (S, Hkv, Dv), mask (T, S) or None -> (T, Hq * Dv), by ggml_flash_attn_ext. GQA
    by broadcasting (Hq a multiple of Hkv). Off on the CPU by default unless `fused`
    (BackendOptions.flash_attention), as in llama.cpp: then the composed ops nn would
    use, whose logits match llama.cpp's; flash attention accumulates V in F16 for an
    F16 cache."""
    if len(self.shape) == 4:
        return _streams(self, k, v, mask, scale, prefix)
    assert prefix is None, "a prefix is attended with streams only (nn composes the rest)"
    c = self._c(k)
    (t, hq, d), (s, hkv, dk), dv = self.shape, k.shape, v.shape[2]
    assert d == dk and v.shape[:2] == (s, hkv) and hq % hkv == 0, (
        f"attention: q {self.shape}, k {k.shape}, v {v.shape}"
    )
    assert mask is None or mask.shape == (t, s), f"attention: mask {mask} for ({t}, {s})"
    q = self.permute(1, 0, 2)  # (Hq, T, D)
    kh, vh = k.permute(1, 0, 2), v.permute(1, 0, 2)  # (Hkv, S, D), (Hkv, S, Dv)
    if not (c.backend.flash_attention if fused is None else fused):
        probs = q.matmul_t(kh).softmax(mask, scale)  # (Hq, T, S)
        # matmul_t copies V only when its rows are not contiguous (a transposed cache
        # hands them over as they are)
        out = probs.matmul_t(vh.permute(0, 2, 1))  # (Hq, T, Dv)
        return out.permute(1, 0, 2).contiguous().reshape(t, hq * dv)
    m = c.f16(mask) if mask is not None else None
    kv = c.src0 if fused is None or c.backend.exact_attention else c.f16  # see options
    p = L.ggml_flash_attn_ext(c.g, c.f32(q), kv(kh), kv(vh), m, scale, 0.0, 0.0)
    L.ggml_flash_attn_ext_set_prec(p, L.PREC_F32)
    return c.out(p, (t, hq, dv)).reshape(t, hq * dv)  # ggml gives (T, Hq, Dv)


def _streams(
    self: GGMLTensor,
    k: GGMLTensor,
    v: GGMLTensor,
    mask: GGMLTensor | None,
    scale: float,
    prefix: tuple[GGMLTensor, GGMLTensor] | None = None,
) -> GGMLTensor:
    """N sequences in one op (`CacheConfig.streams`): q=self (N, T, Hq, D), k
    (N, S, Hkv, D), v (N, S, Hkv, Dv), mask (N, T, S) -> (N * T, Hq * Dv). ggml's
    matmuls, softmax and flash attention all take the sequences as their fourth axis,
    as llama.cpp's per-sequence streams do: one node per layer for 8 decoding
    sequences instead of 8 attentions and their concatenation (a 3000-node decode
    graph, ~15% slower than llama.cpp's on 2 cores)."""
    c = self._c(k)
    (n, t, hq, d), (n_k, s, hkv, dk), dv = self.shape, k.shape, v.shape[3]
    assert n == n_k and d == dk and v.shape[:3] == (n, s, hkv) and hq % hkv == 0, (
        f"attention: q {self.shape}, k {k.shape}, v {v.shape}"
    )
    p = 0 if prefix is None else prefix[0].shape[0]
    assert mask is not None and mask.shape == (n, t, p + s), f"attention: mask {mask}"
    q = self.permute(0, 2, 1, 3)  # (N, Hq, T, D)
    kh, vh = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)  # (N, Hkv, S, D/Dv)
    m = mask.reshape(n, 1, t, p + s)  # one mask per sequence, over its heads
    if prefix is not None:
        return _streams_prefixed(c, q, kh, vh, prefix, m, scale)
    if not c.backend.flash_attention:
        kq = c.out(L.ggml_mul_mat(c.g, c.src0(kh), c.f32(q)), (n, hq, t, s))
        probs = kq.softmax(m, scale)
        vt = vh.permute(0, 1, 3, 2)  # (N, Hkv, Dv, S): rows as a transposed cache has them
        out = c.out(L.ggml_mul_mat(c.g, c.src0(vt), c.f32(probs)), (n, hq, t, dv))
        return out.permute(0, 2, 1, 3).contiguous().reshape(n * t, hq * dv)
    p = L.ggml_flash_attn_ext(c.g, c.f32(q), c.src0(kh), c.src0(vh), c.f16(m), scale, 0, 0)
    L.ggml_flash_attn_ext_set_prec(p, L.PREC_F32)
    return c.out(p, (n, t, hq, dv)).reshape(n * t, hq * dv)  # ggml: (N, T, Hq, Dv)


def _streams_prefixed(
    c: GGMLContext, q: GGMLTensor, kh: GGMLTensor, vh: GGMLTensor,
    prefix: tuple[GGMLTensor, GGMLTensor], m: GGMLTensor, scale: float,
) -> GGMLTensor:  # fmt: skip
    """`_streams` where every sequence also attends a prefix held once (keys (P, Hkv, D),
    values (P, Hkv, Dv)): its scores are one product for all N sequences (ggml broadcasts
    the prefix's one K over the queries' sequences axis), put before each sequence's own,
    one softmax over both, and each part's values weighed by its share of it. A system
    prompt's cells are then held once for every slot and read once a layer. Composed ops
    only: flash attention keeps no log-sum-exp to merge two parts by."""
    (n, hq, t, _), dv = q.shape, vh.shape[3]
    pk, pv = prefix[0].permute(1, 0, 2), prefix[1].permute(1, 2, 0)  # (Hkv, P, D), (Hkv, Dv, P)
    p, s = pk.shape[1], kh.shape[2]
    qp = c.f32(q)
    pre = c.out(L.ggml_mul_mat(c.g, c.src0(pk), qp), (n, hq, t, p))
    own = c.out(L.ggml_mul_mat(c.g, c.src0(kh), qp), (n, hq, t, s))
    probs = pre.concat(own, 3).softmax(m, scale)  # (N, Hq, T, P + S)
    vt = vh.permute(0, 1, 3, 2)  # (N, Hkv, Dv, S): rows as a transposed cache has them
    out = c.out(L.ggml_mul_mat(c.g, c.src0(vt), c.f32(probs.slice(3, p, p + s))), (n, hq, t, dv))
    shared = c.out(L.ggml_mul_mat(c.g, c.src0(pv), c.f32(probs.slice(3, 0, p))), (n, hq, t, dv))
    return out.add(shared).permute(0, 2, 1, 3).contiguous().reshape(n * t, hq * dv)
