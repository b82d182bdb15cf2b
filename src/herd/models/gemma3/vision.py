"""Gemma 3's vision side: the SigLIP encoder and the multimodal projector, bound from either
layout: Ollama's (`v.*` and `mm.*` tensors and `gemma3.vision.*` keys in the model file) or
llama.cpp's projector file (`mmproj`: `general.architecture` "clip", `clip.vision.*` keys,
gguf-py's `v.*`/`mm.*` names). The two differ in names only (`Names`): the projection
matrix keeps transformers' (vision, text) layout and the soft-embedding norm its folded
`1 + w` in both.

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
from gguf.constants import MODEL_TENSOR, TENSOR_NAMES, VisionProjectorType

from herd.gguf import Config as GGUFConfig
from herd.ml import Context, DType, Tensor
from herd.nn import LayerNorm, Linear, PatchEmbedding, RMSNorm, Weights, attention

# Gemma 3's image tokens where a file does not name them (Ollama's files do not):
# <image_soft_token>, as transformers' Gemma3Config has it
IMAGE_TOKEN = 262144
# llama.cpp's projector type for Gemma 3 (`clip.projector_type`)
CLIP_PROJECTOR_TYPE = VisionProjectorType.GEMMA3
# llama.cpp's pooling window where a projector file names none (Gemma 3's 64x64 -> 16x16)
CLIP_SCALE_FACTOR = 4


@dataclass(frozen=True)
class Names:
    """The tensor names of one layout, relative to the vision (`v.`) and projector (`mm.`)
    scopes; per encoder layer under `v.blk.N.`."""

    patch_embedding: str
    position_embedding: str
    layer_norm1: str
    attn_q: str
    attn_k: str
    attn_v: str
    attn_output: str
    layer_norm2: str
    fc1: str
    fc2: str
    post_layernorm: str
    soft_emb_norm: str
    input_projection: str


def _clip(tensor: MODEL_TENSOR, scope: str) -> str:
    """gguf-py's name of a projector-file tensor, without its scope (`v.`, `v.blk.{bid}.`)."""
    name = TENSOR_NAMES[tensor]
    assert name.startswith(scope), (name, scope)
    return name[len(scope) :]


_T, _BLK = MODEL_TENSOR, "v.blk.{bid}."
OLLAMA = Names(
    "patch_embedding",
    "position_embedding",
    "layer_norm1",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "layer_norm2",
    "mlp.fc1",
    "mlp.fc2",
    "post_layernorm",
    "mm_soft_emb_norm",
    "mm_input_projection",
)
CLIP = Names(
    _clip(_T.V_ENC_EMBD_PATCH, "v."),
    _clip(_T.V_ENC_EMBD_POS, "v."),
    _clip(_T.V_ENC_INPUT_NORM, _BLK),
    _clip(_T.V_ENC_ATTN_Q, _BLK),
    _clip(_T.V_ENC_ATTN_K, _BLK),
    _clip(_T.V_ENC_ATTN_V, _BLK),
    _clip(_T.V_ENC_ATTN_O, _BLK),
    _clip(_T.V_ENC_POST_ATTN_NORM, _BLK),
    _clip(_T.V_ENC_FFN_UP, _BLK),
    _clip(_T.V_ENC_FFN_DOWN, _BLK),
    _clip(_T.V_POST_NORM, "v."),
    _clip(_T.V_MM_SOFT_EMB_NORM, "mm."),
    _clip(_T.V_MM_INP_PROJ, "mm."),
)


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

    @classmethod
    def read_clip(cls, c: GGUFConfig, image_token: int) -> VisionConfig:
        """A projector file's (`c` with arch "clip": `clip.vision.*`); its soft tokens per
        image follow from the pooling window (`projector.scale_factor`)."""
        size, patch = c.int("vision.image_size"), c.int("vision.patch_size")
        k = c.int("vision.projector.scale_factor", CLIP_SCALE_FACTOR)
        return cls(
            c.int("vision.block_count"),
            c.int("vision.embedding_length"),
            c.int("vision.feed_forward_length"),
            c.int("vision.attention.head_count"),
            c.float("vision.attention.layer_norm_epsilon", 1e-6),
            size,
            patch,
            3,  # clip.cpp's images are RGB
            (size // patch // k) ** 2,
            tuple(c.get("vision.image_mean", [0.5] * 3)),
            tuple(c.get("vision.image_std", [0.5] * 3)),
            image_token,
        )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pool(self) -> int:
        """The projector's pooling window: patches per side / soft tokens per side."""
        return self.patches_per_side // math.isqrt(self.tokens_per_image)


class EncoderLayer:
    def __init__(self, w: Weights, cfg: VisionConfig, names: Names) -> None:
        d = cfg.n_embd
        self.layer_norm1 = LayerNorm.bind(w, names.layer_norm1, d, cfg.eps)
        self.attn_q = Linear.bind(w, names.attn_q, d, d, bias=True)
        self.attn_k = Linear.bind(w, names.attn_k, d, d, bias=True)
        self.attn_v = Linear.bind(w, names.attn_v, d, d, bias=True)
        self.attn_output = Linear.bind(w, names.attn_output, d, d, bias=True)
        self.layer_norm2 = LayerNorm.bind(w, names.layer_norm2, d, cfg.eps)
        self.fc1 = Linear.bind(w, names.fc1, cfg.n_ff, d, bias=True)
        self.fc2 = Linear.bind(w, names.fc2, d, cfg.n_ff, bias=True)
        self.cfg = cfg

    def forward(self, x: Tensor) -> Tensor:
        cfg, n = self.cfg, x.shape[0]
        hd = cfg.n_embd // cfg.n_head
        h = self.layer_norm1.forward(x)  # (P, D)
        q = self.attn_q.forward(h).reshape(n, cfg.n_head, hd)
        k = self.attn_k.forward(h).reshape(n, cfg.n_head, hd)
        v = self.attn_v.forward(h).reshape(n, cfg.n_head, hd)
        # every patch sees every patch: no cache, no mask
        x = x.add(
            self.attn_output.forward(attention(q, k, v, 1.0 / math.sqrt(hd), None, fused=True))
        )
        h = self.fc2.forward(self.fc1.forward(self.layer_norm2.forward(x)).gelu())
        return x.add(h)


class VisionModel:
    """SigLIP: pixels (3, S, S) -> patch features (P, D), P = (S / p)^2."""

    def __init__(self, w: Weights, cfg: VisionConfig, names: Names = OLLAMA) -> None:
        d, n_patches = cfg.n_embd, cfg.patches_per_side**2
        self.patch_embedding = PatchEmbedding.bind(
            w, names.patch_embedding, d, cfg.n_channels, cfg.patch_size, bias=True
        )
        self.position_embedding = w.get(f"{names.position_embedding}.weight", (n_patches, d))
        self.blk = [EncoderLayer(w.scope(f"blk.{i}"), cfg, names) for i in range(cfg.n_layer)]
        self.post_layernorm = LayerNorm.bind(w, names.post_layernorm, d, cfg.eps)
        self.cfg = cfg

    def forward(self, pixels: Tensor) -> Tensor:
        h = self.patch_embedding.forward(pixels)  # (1, 3, S, S) -> (P, D), row-major patches
        h = h.add(self.position_embedding)
        for layer in self.blk:
            h = layer.forward(h)
        return self.post_layernorm.forward(h)  # (P, D)


class Projector:
    """Patch features (P, Dv) -> soft tokens (tokens_per_image, D_text)."""

    def __init__(
        self, w: Weights, cfg: VisionConfig, n_embd_text: int, names: Names = OLLAMA
    ) -> None:
        self.mm_soft_emb_norm = RMSNorm.bind(w, names.soft_emb_norm, cfg.n_embd, cfg.eps)
        # (Dv, D_text): transformers' layout in both files, x @ W rather than a Linear's x @ W.T
        self.mm_input_projection = w.get(
            f"{names.input_projection}.weight", (cfg.n_embd, n_embd_text)
        )
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
