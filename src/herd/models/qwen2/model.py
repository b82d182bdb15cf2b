"""Qwen2 / Qwen2.5: the llama decoder with biases on Q, K, V and NeoX-style RoPE."""

from __future__ import annotations

import math
from dataclasses import dataclass

from herd.gguf import Config as GGUFConfig
from herd.kvcache import Causal
from herd.ml import Backend, Context, RopeOptions, Tensor
from herd.models.base import Inputs
from herd.models.registry import register
from herd.nn import Embedding, Linear, RMSNorm, Stack, Weights, attention, query_rows


@dataclass(frozen=True)
class Config:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    eps: float
    rope: RopeOptions
    context_length: int

    @classmethod
    def read(cls, c: GGUFConfig) -> Config:
        n_embd, n_head = c.int("embedding_length"), c.int("attention.head_count")
        head_dim = c.int("attention.key_length", n_embd // n_head)
        scaling = c.str("rope.scaling.type", "none")
        factor = c.float("rope.scaling.factor", 1.0)
        rope = RopeOptions(
            dims=c.int("rope.dimension_count", head_dim),
            base=c.float("rope.freq_base", 1e6),
            neox=True,
            freq_scale=1.0 / factor if scaling in ("linear", "yarn") and factor else 1.0,
            ext_factor=1.0 if scaling == "yarn" else 0.0,
            orig_ctx=c.int("rope.scaling.original_context_length", c.int("context_length", 0)),
        )
        return cls(
            c.int("block_count"),
            n_embd,
            c.int("feed_forward_length"),
            n_head,
            c.int("attention.head_count_kv", n_head),
            head_dim,
            c.float("attention.layer_norm_rms_epsilon", 1e-6),
            rope,
            c.int("context_length", 32768),
        )


class Attention:
    def __init__(self, w: Weights, cfg: Config) -> None:
        d, hd = cfg.n_embd, cfg.head_dim
        self.attn_q = Linear.bind(w, "attn_q", cfg.n_head * hd, d, bias=True)
        self.attn_k = Linear.bind(w, "attn_k", cfg.n_head_kv * hd, d, bias=True)
        self.attn_v = Linear.bind(w, "attn_v", cfg.n_head_kv * hd, d, bias=True)
        self.attn_output = Linear.bind(w, "attn_output", d, cfg.n_head * hd)
        Stack.bind(w, self.attn_q, self.attn_k, self.attn_v)
        self.cfg = cfg

    def forward(self, x: Tensor, pos: Tensor, cache: Causal, rows: Tensor | None = None) -> Tensor:
        cfg, t = self.cfg, x.shape[0]
        xq, qpos = query_rows(x, pos, rows)  # the last layer's: only the output rows
        q = self.attn_q.forward(xq).reshape(xq.shape[0], cfg.n_head, cfg.head_dim)
        k = self.attn_k.forward(x).reshape(t, cfg.n_head_kv, cfg.head_dim)
        v = self.attn_v.forward(x).reshape(t, cfg.n_head_kv, cfg.head_dim)
        q, k = q.rope(qpos, cfg.rope), k.rope(pos, cfg.rope)
        out = attention(q, k, v, 1.0 / math.sqrt(cfg.head_dim), cache, rows=rows)
        return self.attn_output.forward(out)


class MLP:
    def __init__(self, w: Weights, cfg: Config) -> None:
        self.ffn_gate = Linear.bind(w, "ffn_gate", cfg.n_ff, cfg.n_embd)
        self.ffn_up = Linear.bind(w, "ffn_up", cfg.n_ff, cfg.n_embd)
        self.ffn_down = Linear.bind(w, "ffn_down", cfg.n_embd, cfg.n_ff)
        Stack.bind(w, self.ffn_gate, self.ffn_up)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_down.forward(self.ffn_gate.forward(x).swiglu(self.ffn_up.forward(x)))


class Block:
    def __init__(self, w: Weights, cfg: Config) -> None:
        self.attn_norm = RMSNorm.bind(w, "attn_norm", cfg.n_embd, cfg.eps)
        self.attn = Attention(w, cfg)
        self.ffn_norm = RMSNorm.bind(w, "ffn_norm", cfg.n_embd, cfg.eps)
        self.mlp = MLP(w, cfg)

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        cache: Causal,
        outputs: Tensor | None = None,
    ) -> Tensor:
        h = self.attn.forward(self.attn_norm.forward(x), pos, cache, outputs)
        if outputs is not None:  # last layer: only the rows whose logits are wanted go on
            x = x.get_rows(outputs)  # (attention gave only theirs)
        x = x.add(h)
        return x.add(self.mlp.forward(self.ffn_norm.forward(x)))


@register("qwen2")
class Model:
    is_embedding = False

    def __init__(self, config: GGUFConfig, backend: Backend) -> None:
        w = Weights(backend)
        cfg = Config.read(config)
        n_vocab = backend.weight("token_embd.weight").shape[0]
        self.config, self.backend, self.cfg = config, backend, cfg
        self.n_vocab, self.context_length = n_vocab, cfg.context_length
        self.token_embd = Embedding.bind(w, "token_embd", n_vocab, cfg.n_embd)
        self.blk = [Block(w.scope(f"blk.{i}"), cfg) for i in range(cfg.n_layer)]
        self.output_norm = RMSNorm.bind(w, "output_norm", cfg.n_embd, cfg.eps)
        self.output = Linear.bind(w, "output", n_vocab, cfg.n_embd, fallback="token_embd.weight")
        self.cache = Causal(self.shift)

    @classmethod
    def from_gguf(cls, config: GGUFConfig, backend: Backend) -> Model:
        return cls(config, backend)

    def forward(self, ctx: Context, inputs: Inputs) -> Tensor:
        h = self.token_embd.forward(inputs.tokens)  # (T, D)
        pos, last = inputs.positions, len(self.blk) - 1
        for i, block in enumerate(self.blk):
            self.cache.set_layer(i)
            rows = inputs.rows if i == last else None  # last layer: output rows only
            h = block.forward(h, pos, self.cache, rows)
        return self.output.forward(self.output_norm.forward(h))  # (N, n_vocab)

    def shift(self, ctx: Context, layer: int, key: Tensor, delta: Tensor) -> Tensor:
        return key.rope(delta, self.cfg.rope)
