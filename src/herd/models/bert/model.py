"""BERT sentence encoders (all-MiniLM, bge, ...) and cross-encoders (ms-marco-MiniLM): a
bidirectional post-norm Transformer.

Embeddings are the sum of token, token-type (all type 0 for an embedding; a rerank pair's
document part is type 1) and learned absolute position embeddings, layer-normed. Each
block: self-attention over the whole sequence, residual, LayerNorm; GELU (erf) MLP,
residual, LayerNorm. Pooling (mean, CLS or last token) turns
each sequence into one vector, L2-normalized. No KV cache: every call encodes whole texts.

A rerank model (`pooling_type` 4, `RankModel`) has BertForSequenceClassification's head
instead: the [CLS] state through the pooler (`cls`: dense + tanh; absent from llama.cpp's
own conversions, which then skip it as llama.cpp does) and the classifier (`cls.output`),
one raw logit per label. It computes no embeddings.

`forward` returns (number of sequences, n_embd): one embedding per distinct sequence id of
the batch, in increasing id order. Sequences in one batch never attend to each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from herd.errors import CapabilityError, UnsupportedModelError
from herd.gguf import Config as GGUFConfig
from herd.ml import Backend, Context, DType, Tensor
from herd.models.base import Batch, Inputs
from herd.models.rank import POOLING_RANK
from herd.models.registry import register
from herd.nn import Embedding, LayerNorm, Linear, Stack, Weights, attention

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
        # llama.cpp's own conversions of cross-encoders name labels and no pooling type
        rank = not c.has("pooling_type") and c.has("classifier.output_labels")
        pooling = c.int("pooling_type", POOLING_RANK if rank else POOLING_MEAN)
        if pooling not in (POOLING_MEAN, POOLING_CLS, POOLING_LAST, POOLING_RANK):
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
        Stack.bind(w, self.attn_q, self.attn_k, self.attn_v)
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
        if Config.read(config).pooling == POOLING_RANK:
            return RankModel(config, backend)
        return cls(config, backend)

    def encode(self, ctx: Context, inputs: Inputs, token_types: np.ndarray) -> Tensor:
        """(T, n_embd): the last layer's state of every row; rows attend within their
        sequence only."""
        batch = inputs.batch
        assert int(batch.positions.max(initial=0)) < self.context_length, (
            f"position {int(batch.positions.max())} >= context length {self.context_length}"
        )
        h = self.token_embd.forward(inputs.tokens)  # (T, D)
        h = h.add(self.position_embd.forward(inputs.positions))
        h = h.add(self.token_types.forward(ctx.input(token_types.astype(np.int32), DType.I32)))
        h = self.token_embd_norm.forward(h)
        seq = batch.sequences
        mask = ctx.input(np.where(seq[:, None] == seq[None, :], 0.0, -np.inf))  # (T, T)
        for block in self.blk:
            h = block.forward(h, mask)
        return h

    def pool(self, ctx: Context, batch: Batch, h: Tensor, pooling: int) -> Tensor:
        """(N, n_embd): one row per sequence, by `pooling`, as a (N, T) x (T, D) product."""
        weights = self._pooling_matrix(batch, pooling)
        n, t, d = weights.shape[0], len(batch.tokens), self.cfg.n_embd
        pool = ctx.input(weights).reshape(1, n, t)  # (1, N, T)
        ht = h.permute(1, 0).contiguous().reshape(1, d, t)  # (1, D, T)
        return pool.matmul_t(ht).reshape(n, d)  # (N, D)

    def forward(self, ctx: Context, inputs: Inputs) -> Tensor:
        h = self.encode(ctx, inputs, np.zeros(len(inputs.batch.tokens), np.int32))
        out = self.pool(ctx, inputs.batch, h, self.cfg.pooling)
        return out.l2_norm(1e-12) if self.cfg.normalize else out

    @staticmethod
    def _pooling_matrix(batch: Batch, pooling: int) -> np.ndarray:
        """(N, T) weights that turn token states into one vector per sequence."""
        seqs = np.unique(batch.sequences)
        pool = np.zeros((len(seqs), len(batch.tokens)), np.float32)
        for row, s in enumerate(seqs):
            (idx,) = np.nonzero(batch.sequences == s)
            if pooling == POOLING_MEAN:
                pool[row, idx] = 1.0 / len(idx)
            elif pooling in (POOLING_CLS, POOLING_RANK):
                pool[row, idx[np.argmin(batch.positions[idx])]] = 1.0
            else:
                pool[row, idx[np.argmax(batch.positions[idx])]] = 1.0
        return pool

    def shift(self, ctx: Context, layer: int, key: Tensor, delta: Tensor) -> Tensor:
        raise NotImplementedError("bert has no KV cache to shift")


class RankModel(Model):
    """A cross-encoder: `rank` scores sequences; `forward` (embeddings) is refused."""

    def __init__(self, config: GGUFConfig, backend: Backend) -> None:
        super().__init__(config, backend)
        w, d = Weights(backend), self.cfg.n_embd
        if not w.has("cls.output.weight"):
            raise UnsupportedModelError(
                "bert: pooling_type 4 (rank) needs a classifier head (cls.output.weight)"
            )
        self.n_labels = backend.weight("cls.output.weight").shape[0]
        # the pooler (dense + tanh); llama.cpp's converter drops it, and llama.cpp then
        # scores from the bare [CLS] state, so a file without it is scored the same way
        self.cls = Linear.bind(w, "cls", d, d, bias=True) if w.has("cls.weight") else None
        self.cls_output = Linear.bind(w, "cls.output", self.n_labels, d, bias=None)

    def forward(self, ctx: Context, inputs: Inputs) -> Tensor:
        raise CapabilityError("a rerank model computes scores, not embeddings")

    def rank(self, ctx: Context, inputs: Inputs, token_types: np.ndarray) -> Tensor:
        # a one-row type table (RoBERTa-style) reads every row as type 0, as HF does
        h = self.encode(ctx, inputs, np.minimum(token_types, self.token_types.weight.shape[0] - 1))
        x = self.pool(ctx, inputs.batch, h, POOLING_CLS)  # (N, D): each [CLS] state
        if self.cls is not None:
            x = self.cls.forward(x).tanh()
        return self.cls_output.forward(x)  # (N, n_labels)
