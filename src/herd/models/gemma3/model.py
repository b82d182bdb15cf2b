"""Gemma 3: local sliding-window and global layers, QK-norm, sandwich norms, GeGLU; with
the vision tower in the file (Ollama's single-file layout) or in a projector file beside a
text-only one (llama.cpp's `mmproj` layout: `from_gguf_with_projector`), images too.

RMSNorm weights are stored as `1 + w` in GGUF (folded at conversion), so every norm here
is a plain RMSNorm.

Images (`vision.py`): each becomes `tokens_per_image` soft tokens whose rows take the
place of the placeholder tokens' embeddings (after the text embeddings' sqrt(d) scaling:
transformers scales the text, not the image features), between "\n\n<start_of_image>"
and "<end_of_image>\n\n" as transformers' processor expands the `<start_of_image>` its
chat template writes. The placeholders of one image attend to each other in both
directions (`Causal(bidirectional=True)`), in the window on local layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from herd.errors import WeightError
from herd.gguf import Config as GGUFConfig
from herd.kvcache import Causal, Wrapper
from herd.ml import Backend, Context, RopeOptions, Tensor
from herd.models.base import Inputs
from herd.models.base import Projector as ProjectorFile
from herd.models.gemma3 import process
from herd.models.gemma3.vision import (
    CLIP,
    CLIP_PROJECTOR_TYPE,
    IMAGE_TOKEN,
    OLLAMA,
    Names,
    Projector,
    VisionConfig,
    VisionModel,
    pixels_input,
)
from herd.models.registry import register
from herd.nn import Embedding, Linear, RMSNorm, Stack, Weights, attention, query_rows

LOCAL, GLOBAL = 0, 1  # cache index per layer type


@dataclass(frozen=True)
class Config:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    eps: float
    window: int
    layer_types: tuple[int, ...]
    rope_local: RopeOptions
    rope_global: RopeOptions
    attn_scale: float
    final_softcap: float
    context_length: int

    @classmethod
    def read(cls, c: GGUFConfig) -> Config:
        n_layer, n_embd = c.int("block_count"), c.int("embedding_length")
        n_head = c.int("attention.head_count")
        head_dim = c.int("attention.key_length", n_embd // n_head)
        pattern = c.get("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # per layer: true = sliding window
            types = tuple(LOCAL if p else GLOBAL for p in pattern)
        else:
            types = tuple(GLOBAL if (i + 1) % int(pattern) == 0 else LOCAL for i in range(n_layer))
        factor = c.float("rope.scaling.factor", 1.0) if c.has("rope.scaling.type") else 1.0
        local_base = c.float("rope.freq_base_swa", c.float("rope.local.freq_base", 10000.0))
        return cls(
            n_layer,
            n_embd,
            c.int("feed_forward_length"),
            n_head,
            c.int("attention.head_count_kv", n_head),
            head_dim,
            c.float("attention.layer_norm_rms_epsilon", 1e-6),
            c.int("attention.sliding_window"),
            types,
            RopeOptions(dims=head_dim, base=local_base, neox=True),
            RopeOptions(
                dims=head_dim,
                base=c.float("rope.freq_base", 1e6),
                neox=True,
                freq_scale=1.0 / factor,
            ),
            1.0 / math.sqrt(c.float("attention.query_pre_attn_scalar", head_dim)),
            c.float("final_logit_softcapping", 0.0),
            c.int("context_length", 32768),
        )


class Attention:
    def __init__(self, w: Weights, cfg: Config, layer_type: int) -> None:
        d, hd = cfg.n_embd, cfg.head_dim
        self.attn_q = Linear.bind(w, "attn_q", cfg.n_head * hd, d)
        self.attn_k = Linear.bind(w, "attn_k", cfg.n_head_kv * hd, d)
        self.attn_v = Linear.bind(w, "attn_v", cfg.n_head_kv * hd, d)
        self.attn_output = Linear.bind(w, "attn_output", d, cfg.n_head * hd)
        Stack.bind(w, self.attn_q, self.attn_k, self.attn_v)
        self.attn_q_norm = RMSNorm.bind(w, "attn_q_norm", hd, cfg.eps)
        self.attn_k_norm = RMSNorm.bind(w, "attn_k_norm", hd, cfg.eps)
        self.rope = cfg.rope_local if layer_type == LOCAL else cfg.rope_global
        self.cfg = cfg

    def forward(self, x: Tensor, pos: Tensor, cache: Wrapper, rows: Tensor | None = None) -> Tensor:
        cfg, t = self.cfg, x.shape[0]
        xq, qpos = query_rows(x, pos, rows)  # the last layer's: only the output rows
        q = self.attn_q.forward(xq).reshape(xq.shape[0], cfg.n_head, cfg.head_dim)
        k = self.attn_k.forward(x).reshape(t, cfg.n_head_kv, cfg.head_dim)
        v = self.attn_v.forward(x).reshape(t, cfg.n_head_kv, cfg.head_dim)
        # Q is scaled before attention, not the scores: the same value, but ggml rounds Q
        # to F16 for the product with an F16 cache, and llama.cpp rounds the scaled Q
        q = self.attn_q_norm.forward(q).rope(qpos, self.rope).scale(cfg.attn_scale)
        k = self.attn_k_norm.forward(k).rope(pos, self.rope)
        return self.attn_output.forward(attention(q, k, v, 1.0, cache, rows=rows))


class MLP:
    def __init__(self, w: Weights, cfg: Config) -> None:
        self.ffn_gate = Linear.bind(w, "ffn_gate", cfg.n_ff, cfg.n_embd)
        self.ffn_up = Linear.bind(w, "ffn_up", cfg.n_ff, cfg.n_embd)
        self.ffn_down = Linear.bind(w, "ffn_down", cfg.n_embd, cfg.n_ff)
        Stack.bind(w, self.ffn_gate, self.ffn_up)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_down.forward(self.ffn_gate.forward(x).geglu(self.ffn_up.forward(x)))


class Block:
    def __init__(self, w: Weights, cfg: Config, layer_type: int) -> None:
        self.attn_norm = RMSNorm.bind(w, "attn_norm", cfg.n_embd, cfg.eps)
        self.attn = Attention(w, cfg, layer_type)
        self.post_attention_norm = RMSNorm.bind(w, "post_attention_norm", cfg.n_embd, cfg.eps)
        self.ffn_norm = RMSNorm.bind(w, "ffn_norm", cfg.n_embd, cfg.eps)
        self.mlp = MLP(w, cfg)
        self.post_ffw_norm = RMSNorm.bind(w, "post_ffw_norm", cfg.n_embd, cfg.eps)

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        cache: Wrapper,
        outputs: Tensor | None = None,
    ) -> Tensor:
        h = self.attn.forward(self.attn_norm.forward(x), pos, cache, outputs)
        if outputs is not None:  # last layer: only the rows whose logits are wanted go on
            x = x.get_rows(outputs)  # (attention gave only theirs)
        x = x.add(self.post_attention_norm.forward(h))
        h = self.mlp.forward(self.ffn_norm.forward(x))
        return x.add(self.post_ffw_norm.forward(h))


@register("gemma3")
class Model:
    """The text model, and the `Vision` protocol when the file has the vision tower or a
    projector file comes with it: `vision` is then set (else None), and so are
    `image_token` and `image_text`, so that `isinstance(model, Vision)` holds only for a
    model that can take images."""

    is_embedding = False
    max_images = 0  # any number: each is its own span of soft tokens
    vision: VisionModel | None = None

    def __init__(
        self, config: GGUFConfig, backend: Backend, projector: ProjectorFile | None = None
    ) -> None:
        w = Weights(backend)
        cfg = Config.read(config)
        n_vocab = backend.weight("token_embd.weight").shape[0]
        self.config, self.backend, self.cfg = config, backend, cfg
        self.n_vocab, self.context_length = n_vocab, cfg.context_length
        self.token_embd = Embedding.bind(w, "token_embd", n_vocab, cfg.n_embd)
        self.blk = [Block(w.scope(f"blk.{i}"), cfg, cfg.layer_types[i]) for i in range(cfg.n_layer)]
        self.output_norm = RMSNorm.bind(w, "output_norm", cfg.n_embd, cfg.eps)
        self.output = Linear.bind(w, "output", n_vocab, cfg.n_embd, fallback="token_embd.weight")
        vcfg = VisionConfig.read(config)
        if projector is not None:
            if vcfg is not None:
                raise WeightError(
                    "this gemma3 file holds its own vision encoder (Ollama's single-file "
                    "layout): it takes no projector file"
                )
            vcfg = _check_projector(config, projector, cfg.n_embd)
            self._init_vision(Weights(projector.backend), vcfg, CLIP)
        elif vcfg is not None:
            self._init_vision(w, vcfg, OLLAMA)
        both = self.vision is not None  # image tokens see each other
        self.cache = Wrapper(
            [
                Causal(self.shift, window=cfg.window, bidirectional=both),
                Causal(self.shift, bidirectional=both),
            ],
            cfg.layer_types,
        )

    def _init_vision(self, w: Weights, vcfg: VisionConfig, names: Names) -> None:
        """The encoder and projector bound to `w`: the model file's, or the projector
        file's (whose backend `encode` then runs on)."""
        self.vcfg = vcfg
        self.vision = VisionModel(w.scope("v"), vcfg, names)
        self.projector = Projector(w.scope("mm"), vcfg, self.cfg.n_embd, names)
        # any id does as a placeholder (its embedding is replaced); an out-of-vocabulary
        # one (a file whose token table stops before <image_soft_token>) would not
        self.image_token = vcfg.image_token if vcfg.image_token < self.n_vocab else 0
        self.image_text = ("\n\n<start_of_image>", "<end_of_image>\n\n")

    @classmethod
    def from_gguf(cls, config: GGUFConfig, backend: Backend) -> Model:
        return cls(config, backend)

    @classmethod
    def from_gguf_with_projector(
        cls, config: GGUFConfig, backend: Backend, projector: ProjectorFile
    ) -> Model:
        """A text-only file with llama.cpp's projector file (`mmproj`) for its images."""
        return cls(config, backend, projector)

    # ---- Vision (only with the vision tower: see the class docstring) ------------------
    def preprocess(self, image: Any) -> np.ndarray:
        """(3, S, S) float32 pixels, as transformers' Gemma3ImageProcessor makes them."""
        v = self.vcfg
        return process.preprocess(image, v.image_size, v.mean, v.std)

    def image_tokens(self, pixels: np.ndarray) -> int:
        return self.vcfg.tokens_per_image

    def encode(self, ctx: Context, pixels: np.ndarray) -> Tensor:
        """(tokens_per_image, n_embd): the rows that replace the placeholders' embeddings."""
        assert self.vision is not None, "gemma3: this file has no vision tower"
        h = self.vision.forward(pixels_input(ctx, pixels))  # (P, Dv)
        return self.projector.forward(ctx, h)

    def forward(self, ctx: Context, inputs: Inputs) -> Tensor:
        h = self.token_embd.forward(inputs.tokens)  # (T, D)
        h = h.scale(math.sqrt(self.cfg.n_embd))
        if inputs.images:  # image rows in place of the placeholders' embeddings
            assert inputs.image_index is not None
            for image in inputs.images:
                h = h.concat(image, 0)  # (T + image rows, D)
            h = h.get_rows(inputs.image_index)  # (T, D)
        pos, last = inputs.positions, len(self.blk) - 1
        for i, block in enumerate(self.blk):
            self.cache.set_layer(i)
            rows = inputs.rows if i == last else None  # last layer: output rows only
            h = block.forward(h, pos, self.cache, rows)
        logits = self.output.forward(self.output_norm.forward(h))  # (N, n_vocab)
        cap = self.cfg.final_softcap
        return logits.scale(1.0 / cap).tanh().scale(cap) if cap else logits

    def shift(self, ctx: Context, layer: int, key: Tensor, delta: Tensor) -> Tensor:
        rope = self.cfg.rope_local if self.cfg.layer_types[layer] == LOCAL else self.cfg.rope_global
        return key.rope(delta, rope)


def _check_projector(config: GGUFConfig, projector: ProjectorFile, n_embd: int) -> VisionConfig:
    """The projector file's vision config, once it is known to be Gemma 3's and to project
    to this text model's width (WeightError otherwise)."""
    c = projector.config
    name = c.get("general.name", None)
    what = f"projector {name!r}" if name else "the projector"
    if c.arch != "clip":
        raise WeightError(f"{what} is not a projector file (general.architecture {c.arch!r})")
    # llama.cpp: a file with several modalities names each one's type
    kind = c.get("vision.projector_type", c.get("projector_type", None))
    if kind != CLIP_PROJECTOR_TYPE or not c.bool("has_vision_encoder", True):
        raise WeightError(
            f"{what} does not match the model: it is a {kind!r} projector, gemma3 takes "
            f"{CLIP_PROJECTOR_TYPE!r}"
        )
    proj = f"mm.{CLIP.input_projection}.weight"  # (Dv, D_text)
    if projector.backend.has_weight(proj):
        width = projector.backend.weight(proj).shape[1]
    else:  # binding reports the missing tensor
        width = c.int("vision.projection_dim", n_embd)
    if width != n_embd:
        raise WeightError(
            f"{what} does not match the model: it projects to {width} but the text "
            f"model's embedding length is {n_embd}"
        )
    # a text-only file has none of herd's image keys: the placeholder by its text
    return VisionConfig.read_clip(c, _token_id(config, "<image_soft_token>", IMAGE_TOKEN))


def _token_id(config: GGUFConfig, text: str, default: int) -> int:
    tokens = config.get("tokenizer.ggml.tokens", [])
    try:
        return tokens.index(text)
    except ValueError:
        return default
