"""The encoder cache: cross-attention keys and values of an image, kept per sequence.

Cross-attention layers (mllama's) attend from the text to the image's encoded states
instead of to earlier tokens. Their keys and values depend on the image only, not on
positions, so they are computed once, in the pass whose batch holds the image's
placeholder token, and kept for every later pass of that sequence. Ollama's EncoderCache
keeps one image for the whole cache (one sequence); this one keeps one per sequence slot,
so parallel conversations each have theirs.

What it supports, and the rule for the pipeline: **one image per sequence**. An image
replaces the one its sequence held (a conversation's second image would silently take
the first one's place for the tokens before it), so prompts with more than one image must
be refused before they get here; Ollama refuses them for mllama too.

Which states a token sees, as transformers' mllama masks them (the processor's
`cross_attention_mask` and `full_text_row_masked_out_mask`), for a token at position p of
a sequence whose image token is at position i:

- p >= i: the image's valid states only (`layout`: the tiles the image has, not the
  padding tiles the encoder ran with); `gates()` = (1, 1).
- p < i (text before the image, e.g. the chat header, in the same prompt): transformers'
  mask is then all zeros, so the token attends to *every* state of the image, padding
  tiles included, and only the MLP half of the layer is zeroed: `gates()` = (1, 0).
- a sequence without an image in a batch where another has one: nothing of the layer
  reaches it (`gates()` = (0, 0); its mask row attends to some image's states only so
  that the zeroed row holds no NaN).

A batch in which no sequence has an image makes the cache inactive (`active` False): the
model skips its cross-attention layers then, as transformers does without images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from herd.kvcache.causal import BatchLayout
from herd.ml import Backend, Context, DType, Tensor

NEG_INF = np.float32(-np.inf)

# an image's embedding -> (states it makes, states that tokens after it see)
Layout = Callable[[np.ndarray], tuple[int, int]]


class _Image(Protocol):
    """What the cache reads of an image in a batch (`herd.models.BatchImage`)."""

    row: int
    embedding: np.ndarray


class Encoder:
    """Per-sequence cross-attention K/V (see the module docstring).

    `layout(embedding)` says how many key/value rows an image's embedding makes and how
    many of them tokens after the image attend to; the default is all of them.
    """

    def __init__(self, layout: Layout | None = None) -> None:
        self.layout: Layout = layout or (lambda e: (e.shape[0], e.shape[0]))
        self.backend: Backend | None = None
        self.active = False

    # ---- runner side -------------------------------------------------------------------
    def init(
        self, backend: Backend, dtype: DType, max_sequences: int, capacity: int, max_batch: int
    ) -> None:
        self.backend, self.dtype = backend, dtype
        self.mask_dtype = backend.cache_config().mask_dtype
        self.max_sequences = max_sequences
        self.rows: int | None = None  # K/V rows of one image, fixed by the first image
        self.image_pos = np.full(max_sequences, -1, dtype=np.int64)  # -1: no image
        self.valid = np.zeros(max_sequences, dtype=np.int64)
        self.keys: dict[int, Tensor] = {}  # layer -> (max_sequences * rows, Hkv * D)
        self.values: dict[int, Tensor] = {}
        self._head_shapes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.layer = 0
        self._planned: BatchLayout | None = None
        self.lo = self.hi = 0

    @property
    def size(self) -> int:
        return self.max_sequences * (self.rows or 0)

    def used_cells(self) -> int:
        return int(np.count_nonzero(self.image_pos >= 0)) * (self.rows or 0)

    def stats(self) -> dict[str, float]:
        """As `Causal.stats`: an image's rows fill one sequence's block, nothing moves."""
        return {"cells_used": self.used_cells(), "cells": self.size}

    def seq_length(self, seq: int) -> int:
        return 0  # positions live in the causal cache beside this one

    def start_forward(self, ctx: Context, batch: BatchLayout) -> None:
        """Take the batch's images for their sequences and build this pass's mask.

        The batch is a `herd.models.Batch` (its `images` are read); called again with the
        same batch, only the inputs are made again, in the new context.
        """
        if batch is not self._planned:
            self._plan(batch, list(getattr(batch, "images", ())))
            self._planned = batch
        self.ctx = ctx
        self.locs = ctx.input(self._locs, DType.I32) if len(self._locs) else None
        if self.active:
            self.mask = ctx.input(self._mask_array, self.mask_dtype)
            self.attn_gate = ctx.input(self._gates[:, :1])
            self.mlp_gate = ctx.input(self._gates[:, 1:])

    def _plan(self, batch: BatchLayout, images: Sequence[_Image]) -> None:
        seqs, positions = batch.sequences, batch.positions
        locs = []
        taken: set[int] = set()
        for im in images:
            seq, pos = int(seqs[im.row]), int(positions[im.row])
            rows, valid = self.layout(im.embedding)
            if seq in taken:
                raise ValueError("an encoder cache takes one image per sequence and batch")
            if self.rows is None:
                self.rows = rows
            if rows != self.rows:
                raise ValueError(f"an image of {rows} states for a cache of {self.rows}")
            taken.add(seq)
            self.image_pos[seq], self.valid[seq] = pos, valid
            locs.append(np.arange(seq * rows, (seq + 1) * rows))
        self._locs = np.concatenate(locs).astype(np.int32) if locs else np.zeros(0, np.int32)
        with_image = [int(s) for s in np.unique(seqs) if self.image_pos[s] >= 0]
        self.active = bool(with_image)
        if not self.active:
            self.lo = self.hi = 0
            return
        n = self.rows
        assert n is not None
        self.lo, self.hi = min(with_image), max(with_image) + 1
        col = np.arange((self.hi - self.lo) * n)
        slot, idx = self.lo + col // n, col % n  # (S,): each column's sequence and row
        image_pos = self.image_pos[seqs]  # (T,)
        has = image_pos >= 0
        after = has & (positions >= image_pos)
        seen = np.where(after, self.valid[seqs], n)  # (T,): rows a token sees
        ok = (slot[None, :] == seqs[:, None]) & (idx[None, :] < seen[:, None])
        ok[~has] = slot == self.lo  # finite numbers for rows the gates zero
        self._mask_array = np.where(ok, np.float32(0), NEG_INF)
        self._gates = np.stack([has, after], axis=1).astype(np.float32)  # (T, 2)

    def view_key(self) -> tuple[bool, int, int]:
        """Whether cross-attention runs, and over which sequences' states."""
        return self.active, self.lo, self.hi

    def remove(self, seq: int, begin: int, end: int | None = None) -> None:
        """Forget the image when its token is among the removed positions; an image after
        them moves back with the tokens."""
        self._planned = None
        pos = int(self.image_pos[seq])
        if pos < 0 or pos < begin:
            return
        if end is None or pos < end:
            self.image_pos[seq] = -1
        else:
            self.image_pos[seq] = pos - (end - begin)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """dst takes src's image when src's image token is among its first n positions."""
        self._planned = None
        self.image_pos[dst] = -1
        if not 0 <= self.image_pos[src] < n or self.rows is None or not self.keys:
            return
        assert self.backend is not None
        rows = self.rows
        with self.backend.new_context() as ctx:
            s = ctx.input(np.arange(src * rows, (src + 1) * rows, dtype=np.int32), DType.I32)
            d = ctx.input(np.arange(dst * rows, (dst + 1) * rows, dtype=np.int32), DType.I32)
            for store in (*self.keys.values(), *self.values.values()):
                ctx.forward(store.set_rows(d, store.get_rows(s)))
            ctx.compute()
        self.image_pos[dst], self.valid[dst] = self.image_pos[src], self.valid[src]

    def can_resume(self, seq: int, pos: int) -> bool:
        return True

    def snapshot(self, seq: int, n: int, base: object = None, start: int = 0) -> None:
        """Not kept in a prompt cache: an image's cross-attention states are per slot."""
        return None

    def restore(self, seq: int, snap: object, n: int, start: int = 0) -> bool:
        return False

    def shareable(self, src: int, n: int) -> int:
        """None: an image's cross-attention states are per slot."""
        return 0

    # ---- model side --------------------------------------------------------------------
    def set_layer(self, layer: int) -> None:
        self.layer = layer

    def put(self, k: Tensor, v: Tensor) -> None:
        """k (R, Hkv, D), v (R, Hkv, Dv): the states of the batch's images, in batch order,
        for the current layer."""
        assert self.locs is not None, "put without an image in the batch"
        r = k.shape[0]
        if self.layer not in self.keys:
            assert self.backend is not None and self.rows is not None, "cache used before init"
            n = self.max_sequences * self.rows
            kd, vd = k.shape[1] * k.shape[2], v.shape[1] * v.shape[2]
            self.keys[self.layer] = self.backend.alloc((n, kd), self.dtype, layer=self.layer)
            self.values[self.layer] = self.backend.alloc((n, vd), self.dtype, layer=self.layer)
            self._head_shapes[self.layer] = (tuple(k.shape[1:]), tuple(v.shape[1:]))
        self.ctx.forward(
            self.keys[self.layer].set_rows(self.locs, k.reshape(r, k.shape[1] * k.shape[2])),
            self.values[self.layer].set_rows(self.locs, v.reshape(r, v.shape[1] * v.shape[2])),
        )

    def get(self) -> tuple[Tensor, Tensor, Tensor]:
        """Keys (S, Hkv, D), values (S, Hkv, Dv) of the batch's sequences' images, and the
        mask (T, S)."""
        assert self.rows is not None
        a, b = self.lo * self.rows, self.hi * self.rows
        k = self.ctx.attach(self.keys[self.layer]).slice(0, a, b)
        v = self.ctx.attach(self.values[self.layer]).slice(0, a, b)
        shape_k, shape_v = self._head_shapes[self.layer]
        return k.reshape(b - a, *shape_k), v.reshape(b - a, *shape_v), self.mask

    def gates(self) -> tuple[Tensor, Tensor]:
        """(T, 1) factors of the layer's attention and MLP outputs, per token."""
        return self.attn_gate, self.mlp_gate

    def prefix(self) -> tuple[Tensor, Tensor, Tensor] | None:
        return None

    def blocks(self) -> list[tuple[int, int, Tensor, Tensor, Tensor]]:
        return []
