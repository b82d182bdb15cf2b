"""BERT sentence encoders (all-MiniLM, bge, ...): a bidirectional post-norm Transformer.

Embeddings are the sum of token, token-type (all type 0) and learned absolute position
embeddings, layer-normed. Each block: self-attention over the whole sequence, residual,
LayerNorm; GELU (erf) MLP, residual, LayerNorm. Pooling (mean, CLS or last token) turns
each sequence into one vector, L2-normalized. No KV cache: every call encodes whole texts.

`forward` returns (number of sequences, n_embd): one embedding per distinct sequence id of
the batch, in increasing id order. Sequences in one batch never attend to each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from herd.errors import UnsupportedModelError
from herd.gguf import Config as GGUFConfig
from herd.ml import Backend, Context, DType, Tensor
from herd.models.base import Batch, Inputs
from herd.models.registry import register
from herd.nn import Embedding, LayerNorm, Linear, Weights, attention

POOLING_NONE, POOLING_MEAN, POOLING_CLS, POOLING_LAST = 0, 1, 2, 3


@dataclass(frozen=True)
class Config:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    eps: float
    pooling: int
    normalize: bool
    context_length: int

    @classmethod
    def read(cls, c: GGUFConfig) -> Config:
        if c.bool("attention.causal", False):
            raise UnsupportedModelError("bert: causal attention is not supported")
        pooling = c.int("pooling_type", POOLING_MEAN)
        if pooling not in (POOLING_MEAN, POOLING_CLS, POOLING_LAST):
            raise UnsupportedModelError(f"bert: pooling_type {pooling} is not supported")
        return cls(
            c.int("block_count"),
            c.int("embedding_length"),
            c.int("feed_forward_length"),
            c.int("attention.head_count"),
            c.float("attention.layer_norm_epsilon", 1e-12),
            pooling,
            c.bool("normalize_embeddings", True),
            c.int("context_length", 512),
        )


class Attention:
    def __init__(self, w: Weights, cfg: Config) -> None:
        d = cfg.n_embd
        self.attn_q = Linear.bind(w, "attn_q", d, d, bias=True)
        self.attn_k = Linear.bind(w, "attn_k", d, d, bias=True)
        self.attn_v = Linear.bind(w, "attn_v", d, d, bias=True)
        self.attn_output = Linear.bind(w, "attn_output", d, d, bias=True)
        self.cfg = cfg

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        t, h = x.shape[0], self.cfg.n_head
        hd = self.cfg.n_embd // h
        q = self.attn_q.forward(x).reshape(t, h, hd)  # (T, H, D)
        k = self.attn_k.forward(x).reshape(t, h, hd)
        v = self.attn_v.forward(x).reshape(t, h, hd)
        return self.attn_output.forward(attention(q, k, v, 1.0 / math.sqrt(hd), None, mask))


class MLP:
    def __init__(self, w: Weights, cfg: Config) -> None:
        self.ffn_up = Linear.bind(w, "ffn_up", cfg.n_ff, cfg.n_embd, bias=True)
        self.ffn_down = Linear.bind(w, "ffn_down", cfg.n_embd, cfg.n_ff, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_down.forward(self.ffn_up.forward(x).gelu_erf())


class Block:
    def __init__(self, w: Weights, cfg: Config) -> None:
        self.attn = Attention(w, cfg)
        self.attn_output_norm = LayerNorm.bind(w, "attn_output_norm", cfg.n_embd, cfg.eps)
        self.mlp = MLP(w, cfg)
        self.layer_output_norm = LayerNorm.bind(w, "layer_output_norm", cfg.n_embd, cfg.eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.attn_output_norm.forward(x.add(self.attn.forward(x, mask)))
        return self.layer_output_norm.forward(x.add(self.mlp.forward(x)))


@register("bert")
class Model:
    is_embedding = True

    def __init__(self, config: GGUFConfig, backend: Backend) -> None:
        w = Weights(backend)
        cfg = Config.read(config)
        n_vocab = backend.weight("token_embd.weight").shape[0]
        self.config, self.backend, self.cfg = config, backend, cfg
        self.n_vocab, self.context_length = n_vocab, cfg.context_length
        self.cache = None  # an encoder: whole texts each call
        d = cfg.n_embd
        self.token_embd = Embedding.bind(w, "token_embd", n_vocab, d)
        n_types = backend.weight("token_types.weight").shape[0]
        self.token_types = Embedding.bind(w, "token_types", n_types, d)
        self.position_embd = Embedding.bind(w, "position_embd", cfg.context_length, d)
        self.token_embd_norm = LayerNorm.bind(w, "token_embd_norm", d, cfg.eps)
        self.blk = [Block(w.scope(f"blk.{i}"), cfg) for i in range(cfg.n_layer)]

    @classmethod
    def from_gguf(cls, config: GGUFConfig, backend: Backend) -> Model:
        return cls(config, backend)

    def forward(self, ctx: Context, inputs: Inputs) -> Tensor:
        batch = inputs.batch
        t = len(batch.tokens)
        assert int(batch.positions.max(initial=0)) < self.context_length, (
            f"position {int(batch.positions.max())} >= context length {self.context_length}"
        )
        h = self.token_embd.forward(inputs.tokens)  # (T, D)
        h = h.add(self.position_embd.forward(inputs.positions))
        h = h.add(self.token_types.forward(ctx.input(np.zeros(t, np.int32), DType.I32)))
        h = self.token_embd_norm.forward(h)
        seq = batch.sequences
        mask = ctx.input(np.where(seq[:, None] == seq[None, :], 0.0, -np.inf))  # (T, T)
        for block in self.blk:
            h = block.forward(h, mask)
        weights = self._pooling_matrix(batch)
        n, d = weights.shape[0], self.cfg.n_embd
        pool = ctx.input(weights).reshape(1, n, t)  # (1, N, T)
        ht = h.permute(1, 0).contiguous().reshape(1, d, t)  # (1, D, T)
        out = pool.matmul_t(ht).reshape(n, d)  # (N, D)
        return out.l2_norm(1e-12) if self.cfg.normalize else out

    def _pooling_matrix(self, batch: Batch) -> np.ndarray:
        """(N, T) weights that turn token states into one vector per sequence."""
        seqs = np.unique(batch.sequences)
        pool = np.zeros((len(seqs), len(batch.tokens)), np.float32)
        for row, s in enumerate(seqs):
            (idx,) = np.nonzero(batch.sequences == s)
            if self.cfg.pooling == POOLING_MEAN:
                pool[row, idx] = 1.0 / len(idx)
            elif self.cfg.pooling == POOLING_CLS:
                pool[row, idx[np.argmin(batch.positions[idx])]] = 1.0
            else:
                pool[row, idx[np.argmax(batch.positions[idx])]] = 1.0
        return pool

    def shift(self, ctx: Context, layer: int, key: Tensor, delta: Tensor) -> Tensor:
        raise NotImplementedError("bert has no KV cache to shift")
