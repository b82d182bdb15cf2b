"""Gemma 3's vision side: the SigLIP encoder and the multimodal projector (Ollama's `v.*` and
`mm.*` tensors, `gemma3.vision.*` keys).

An image (3, S, S) is cut into (S / p)^2 patches of p x p pixels, each embedded by one
convolution step and given its learned position; SigLIP's pre-norm encoder layers
(LayerNorm with bias, bidirectional multi-head attention with biases, fc1 -> tanh GELU ->
fc2) and a final LayerNorm follow. The projector pools the patch grid to
`mm.tokens_per_image` soft tokens (average over k x k windows), normalizes them (Gemma's
RMSNorm, `1 + w` folded at conversion) and projects them to the text model's width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from herd.gguf import Config as GGUFConfig
from herd.ml import Context, DType, Tensor
from herd.nn import LayerNorm, Linear, PatchEmbedding, RMSNorm, Weights, attention

# Gemma 3's image tokens where a file does not name them (Ollama's files do not):
# <image_soft_token>, as transformers' Gemma3Config has it
IMAGE_TOKEN = 262144


@dataclass(frozen=True)
class VisionConfig:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    eps: float
    image_size: int
    patch_size: int
    n_channels: int
    tokens_per_image: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_token: int

    @classmethod
    def read(cls, c: GGUFConfig) -> VisionConfig | None:
        """None for a file without the vision tower (a text-only Gemma 3)."""
        if not c.has("vision.block_count"):
            return None
        return cls(
            c.int("vision.block_count"),
            c.int("vision.embedding_length"),
            c.int("vision.feed_forward_length"),
            c.int("vision.attention.head_count"),
            c.float("vision.attention.layer_norm_epsilon", 1e-6),
            c.int("vision.image_size"),
            c.int("vision.patch_size"),
            c.int("vision.num_channels", 3),
            # Ollama's converter writes mm.tokens_per_image; its model reads
            # mm_tokens_per_image (default 256): either
            c.int("mm.tokens_per_image", c.int("mm_tokens_per_image", 256)),
            tuple(c.get("vision.image_mean", [0.5] * 3)),  # herd's keys; Ollama
            tuple(c.get("vision.image_std", [0.5] * 3)),  # hard-codes 0.5
            c.int("image_token_id", IMAGE_TOKEN),
        )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pool(self) -> int:
        """The projector's pooling window: patches per side / soft tokens per side."""
        return self.patches_per_side // math.isqrt(self.tokens_per_image)


class EncoderLayer:
    def __init__(self, w: Weights, cfg: VisionConfig) -> None:
        d = cfg.n_embd
        self.layer_norm1 = LayerNorm.bind(w, "layer_norm1", d, cfg.eps)
        self.attn_q = Linear.bind(w, "attn_q", d, d, bias=True)
        self.attn_k = Linear.bind(w, "attn_k", d, d, bias=True)
        self.attn_v = Linear.bind(w, "attn_v", d, d, bias=True)
        self.attn_output = Linear.bind(w, "attn_output", d, d, bias=True)
        self.layer_norm2 = LayerNorm.bind(w, "layer_norm2", d, cfg.eps)
        self.fc1 = Linear.bind(w, "mlp.fc1", cfg.n_ff, d, bias=True)
        self.fc2 = Linear.bind(w, "mlp.fc2", d, cfg.n_ff, bias=True)
        self.cfg = cfg

    def forward(self, x: Tensor) -> Tensor:
        cfg, n = self.cfg, x.shape[0]
        hd = cfg.n_embd // cfg.n_head
        h = self.layer_norm1.forward(x)  # (P, D)
        q = self.attn_q.forward(h).reshape(n, cfg.n_head, hd)
        k = self.attn_k.forward(h).reshape(n, cfg.n_head, hd)
        v = self.attn_v.forward(h).reshape(n, cfg.n_head, hd)
        # every patch sees every patch: no cache, no mask
        x = x.add(self.attn_output.forward(attention(q, k, v, 1.0 / math.sqrt(hd), None)))
        h = self.fc2.forward(self.fc1.forward(self.layer_norm2.forward(x)).gelu())
        return x.add(h)


class VisionModel:
    """SigLIP: pixels (3, S, S) -> patch features (P, D), P = (S / p)^2."""

    def __init__(self, w: Weights, cfg: VisionConfig) -> None:
        d, n_patches = cfg.n_embd, cfg.patches_per_side**2
        self.patch_embedding = PatchEmbedding.bind(
            w, "patch_embedding", d, cfg.n_channels, cfg.patch_size, bias=True
        )
        self.position_embedding = w.get("position_embedding.weight", (n_patches, d))
        self.blk = [EncoderLayer(w.scope(f"blk.{i}"), cfg) for i in range(cfg.n_layer)]
        self.post_layernorm = LayerNorm.bind(w, "post_layernorm", d, cfg.eps)
        self.cfg = cfg

    def forward(self, pixels: Tensor) -> Tensor:
        h = self.patch_embedding.forward(pixels)  # (1, 3, S, S) -> (P, D), row-major patches
        h = h.add(self.position_embedding)
        for layer in self.blk:
            h = layer.forward(h)
        return self.post_layernorm.forward(h)  # (P, D)


class Projector:
    """Patch features (P, Dv) -> soft tokens (tokens_per_image, D_text)."""

    def __init__(self, w: Weights, cfg: VisionConfig, n_embd_text: int) -> None:
        self.mm_soft_emb_norm = RMSNorm.bind(w, "mm_soft_emb_norm", cfg.n_embd, cfg.eps)
        # (Dv, D_text): transformers' and Ollama's layout, x @ W rather than a Linear's x @ W.T
        self.mm_input_projection = w.get("mm_input_projection.weight", (cfg.n_embd, n_embd_text))
        self.cfg = cfg

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        cfg = self.cfg
        side, d = cfg.patches_per_side, cfg.n_embd
        grid = x.permute(1, 0).contiguous().reshape(1, d, side, side)  # (1, Dv, side, side)
        pooled = grid.avg_pool2d(cfg.pool)  # (1, Dv, side / k, side / k)
        n = pooled.shape[2] * pooled.shape[3]
        h = pooled.reshape(d, n).permute(1, 0).contiguous()  # (N, Dv), row-major as torch's
        h = self.mm_soft_emb_norm.forward(h)
        # the weight transposed once per image (as Ollama and llama.cpp do); via F32 so
        # a quantized file's works too
        w = ctx.attach(self.mm_input_projection).cast(DType.F32).permute(1, 0).contiguous()
        return h.linear(w)  # (N, D_text)


def pixels_input(ctx: Context, pixels: np.ndarray) -> Tensor:
    """The (1, 3, S, S) input of a preprocessed (3, S, S) image."""
    return ctx.input(np.ascontiguousarray(pixels, np.float32)[None])
