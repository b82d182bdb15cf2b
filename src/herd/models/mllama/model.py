"""mllama (Llama 3.2 Vision): a Llama 3 decoder with gated cross-attention layers that
read a tiled vision encoder's states.

The layers at `attention.cross_attention_layers` replace self-attention with attention
from the text to the image's states (Q and K RMS-normed per head, no rotary embedding)
and scale their attention and MLP outputs by tanh gates. Their keys and values are made
once, in the pass whose batch holds the image's `<|image|>` token (the BatchImage row),
and kept per sequence by the `Encoder` cache, which also masks them as transformers does
(see `herd.kvcache.encoder`); a pass in which no sequence has an image skips those layers.
The self-attention layers are llama's, over a `Causal` cache: `Wrapper(Causal, Encoder)`.

An image is one placeholder token; `encode` returns the projected states of all
`max_num_tiles` tiles (the padding tiles too: text before the image attends to them in
transformers) and one more row whose first value is how many states belong to the image's
own tiles, which tokens after the image attend to. Only one image per prompt (Ollama's
rule for mllama; `herd.kvcache.encoder`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from herd.errors import UnsupportedModelError
from herd.gguf import Config as GGUFConfig
from herd.kvcache import Causal, Encoder, Wrapper
from herd.ml import Backend, Context, Tensor
from herd.models.base import Inputs
from herd.models.llama.model import MLP, Block, Config
from herd.models.mllama import process
from herd.models.mllama.vision import VisionConfig, VisionModel
from herd.models.registry import register
from herd.nn import Embedding, Linear, RMSNorm, Weights, attention


class CrossBlock:
    """A cross-attention decoder layer: attention to the image's states, then the MLP,
    each gated by tanh(gate) and by the Encoder's per-token gates."""

    def __init__(self, w: Weights, cfg: Config) -> None:
        d, hd = cfg.n_embd, cfg.head_dim
        self.attn_norm = RMSNorm.bind(w, "attn_norm", d, cfg.eps)
        self.q_proj = Linear.bind(w, "cross_attn_q_proj", cfg.n_head * hd, d)
        self.k_proj = Linear.bind(w, "cross_attn_k_proj", cfg.n_head_kv * hd, d)
        self.v_proj = Linear.bind(w, "cross_attn_v_proj", cfg.n_head_kv * hd, d)
        self.o_proj = Linear.bind(w, "cross_attn_o_proj", d, cfg.n_head * hd)
        self.q_norm = RMSNorm.bind(w, "cross_attn_q_norm", hd, cfg.eps)
        self.k_norm = RMSNorm.bind(w, "cross_attn_k_norm", hd, cfg.eps)
        self.attn_gate = w.get("cross_attn_attn_gate", (1,))  # raw: tanh taken here
        self.mlp_gate = w.get("cross_attn_mlp_gate", (1,))
        self.ffn_norm = RMSNorm.bind(w, "ffn_norm", d, cfg.eps)
        self.mlp = MLP(w, cfg)
        self.cfg = cfg

    def forward(
        self,
        ctx: Context,
        x: Tensor,
        states: Tensor | None,
        cache: Encoder,
        rows: Tensor | None = None,
    ) -> Tensor:
        """x (T, D); states (R, D) of the batch's new images or None; rows: the last
        layer's output rows (None: all)."""
        cfg, hd = self.cfg, self.cfg.head_dim
        h = self.attn_norm.forward(x)
        if rows is not None:
            h, x = h.get_rows(rows), x.get_rows(rows)
        n = h.shape[0]
        q = self.q_norm.forward(self.q_proj.forward(h).reshape(n, cfg.n_head, hd))
        if states is not None:
            r = states.shape[0]
            k = self.k_norm.forward(self.k_proj.forward(states).reshape(r, cfg.n_head_kv, hd))
            cache.put(k, self.v_proj.forward(states).reshape(r, cfg.n_head_kv, hd))
        k, v, mask = cache.get()
        keep_attn, keep_mlp = cache.gates()  # (T, 1) each
        if rows is not None:
            mask = mask.get_rows(rows)
            keep_attn, keep_mlp = keep_attn.get_rows(rows), keep_mlp.get_rows(rows)
        out = self.o_proj.forward(attention(q, k, v, 1.0 / math.sqrt(hd), None, mask=mask))
        x = x.add(out.mul(ctx.attach(self.attn_gate).tanh()).mul(keep_attn))
        h = self.mlp.forward(self.ffn_norm.forward(x)).mul(keep_mlp)
        return x.add(h.mul(ctx.attach(self.mlp_gate).tanh()))


def _layout(embedding: np.ndarray) -> tuple[int, int]:
    """(states, states of the image's own tiles) of an `encode` output."""
    return embedding.shape[0] - 1, int(embedding[-1, 0])


@register("mllama")
class Model:
    is_embedding = False
    image_text = ("", "")
    max_images = 1  # one image's cross-attention states per sequence, as Ollama's mllama

    def __init__(self, config: GGUFConfig, backend: Backend) -> None:
        w = Weights(backend)
        n_vocab = backend.weight("output.weight").shape[0]
        try:
            cfg = Config.read(config, n_vocab)
            vcfg = VisionConfig.read(config)
        except ValueError as e:
            raise UnsupportedModelError(str(e)) from None
        self.config, self.backend, self.cfg, self.vcfg = config, backend, cfg, vcfg
        self.n_vocab, self.context_length = n_vocab, cfg.context_length
        self.image_token = n_vocab  # <|image|>: the first row past the text vocabulary
        self.cross = {int(i) for i in config.get("attention.cross_attention_layers")}
        rows = backend.weight("token_embd.weight").shape[0]
        if rows <= self.image_token:
            raise UnsupportedModelError(f"mllama: token_embd has no row {self.image_token}")
        self.token_embd = Embedding.bind(w, "token_embd", rows, cfg.n_embd)
        self.blk: list[Block | CrossBlock] = [
            CrossBlock(w.scope(f"blk.{i}"), cfg)
            if i in self.cross
            else Block(w.scope(f"blk.{i}"), cfg)
            for i in range(cfg.n_layer)
        ]
        self.output_norm = RMSNorm.bind(w, "output_norm", cfg.n_embd, cfg.eps)
        self.output = Linear.bind(w, "output", n_vocab, cfg.n_embd)
        self.rope_freqs = w.optional("rope_freqs.weight", (cfg.rope.dims // 2,))
        self.vision = VisionModel(w.scope("v"), vcfg, cfg.n_embd)
        self.projector = Linear.bind(w, "mm.0", cfg.n_embd, vcfg.n_out, bias=True)
        self.causal, self.encoder = Causal(self.shift), Encoder(_layout)
        types = [1 if i in self.cross else 0 for i in range(cfg.n_layer)]
        self.cache = Wrapper([self.causal, self.encoder], types)

    @classmethod
    def from_gguf(cls, config: GGUFConfig, backend: Backend) -> Model:
        return cls(config, backend)

    # ---- images ------------------------------------------------------------------------
    def preprocess(self, image: Any) -> process.Tiles:
        return process.preprocess(image, tile=self.vcfg.image_size, max_tiles=self.vcfg.max_tiles)

    def image_tokens(self, pixels: process.Tiles) -> int:
        return 1  # one <|image|>; the states go to the cross-attention layers

    def encode(self, ctx: Context, pixels: process.Tiles) -> Tensor:
        """(max_tiles * n_pos + 1, n_embd): the projected states, then the count row."""
        states = self.projector.forward(self.vision.forward(ctx, pixels))
        count = np.zeros((1, self.cfg.n_embd), np.float32)
        count[0, 0] = pixels.n_tiles * self.vcfg.n_pos
        return states.concat(ctx.input(count), 0)

    # ---- text --------------------------------------------------------------------------
    def forward(self, ctx: Context, inputs: Inputs) -> Tensor:
        h = self.token_embd.forward(inputs.tokens)  # (T, D)
        states = None
        for im in inputs.images:  # the new images' states, in batch order
            s = im.slice(0, 0, im.shape[0] - 1)
            states = s if states is None else states.concat(s, 0)
        pos, last, selected = inputs.positions, len(self.blk) - 1, False
        for i, block in enumerate(self.blk):
            self.cache.set_layer(i)
            rows = inputs.rows if i == last else None  # last layer: output rows only
            if isinstance(block, CrossBlock):
                if not self.encoder.active:
                    continue  # no image for any sequence of the batch: as transformers
                h = block.forward(ctx, h, states, self.encoder, rows)
            else:
                h = block.forward(h, pos, self.cache, self.rope_freqs, rows)
            selected = rows is not None
        if inputs.rows is not None and not selected:
            h = h.get_rows(inputs.rows)  # the last layer was a skipped cross layer
        return self.output.forward(self.output_norm.forward(h))  # (N, n_vocab)

    def shift(self, ctx: Context, layer: int, key: Tensor, delta: Tensor) -> Tensor:
        return key.rope(delta, self.cfg.rope, self.rope_freqs)
