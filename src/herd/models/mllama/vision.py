"""mllama's tiled vision encoder and projector (transformers' MllamaVisionModel).

An image comes as up to `max_num_tiles` square tiles (`process.Tiles`), always run as
`max_num_tiles` (zero tiles after the image's), as transformers and Ollama run them. Each
tile is cut into patches (a convolution with stride = kernel = patch), gets the tile's
aspect-ratio embedding (pre-tile), a class token in front, the patch position embedding
and the tile-position embedding (their two gates sum to 1), and a layer norm; each tile's
tokens are padded with zero tokens to a multiple of 8. The local layers then attend over
all the tokens of all the tiles: transformers' mask hides a padding token (a padded patch,
or any token of a padded tile) only from other padding tokens, so the image's tokens see
the padding too, and herd keeps that. (When a tile's tokens are already a multiple of 8,
transformers masks every pair alike, a quirk of its slicing that no released checkpoint
meets: herd then masks only the padding tiles' tokens from each other.) After a layer
norm, the post-tile aspect-ratio embedding and the gated global layers, the padding
patches are dropped and the final features are concatenated with the intermediate ones
(the inputs of the local layers at `intermediate_layers_indices`, interleaved feature by
feature), then projected to the text model's width.

Intermediate features are the layers' *inputs*, as in Meta's reference, Ollama and
transformers 4.45, in which Llama 3.2 Vision was released; later transformers (4.5x, 5.x)
take the layers' outputs instead (one layer later), which the tests undo in the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from herd.gguf import Config as GGUFConfig
from herd.ml import Context, DType, Tensor
from herd.models.mllama.process import Tiles
from herd.nn import LayerNorm, Linear, Weights, attention

# layernorm_pre/post are built with torch's default epsilon whatever the config says
PRE_POST_EPS = 1e-5


@dataclass(frozen=True)
class VisionConfig:
    n_layer: int
    n_global: int
    n_embd: int
    n_ff: int
    n_head: int
    eps: float
    image_size: int
    patch_size: int
    max_tiles: int
    channels: int
    intermediate: tuple[int, ...]

    @classmethod
    def read(cls, c: GGUFConfig) -> VisionConfig:
        v = "vision."
        return cls(
            c.int(v + "block_count"),
            c.int(v + "global.block_count"),
            c.int(v + "embedding_length"),
            c.int(v + "feed_forward_length"),
            c.int(v + "attention.head_count"),
            c.float(v + "attention.layer_norm_epsilon", 1e-5),
            c.int(v + "image_size"),
            c.int(v + "patch_size"),
            c.int(v + "max_num_tiles"),
            c.int(v + "num_channels", 3),
            tuple(int(i) for i in c.get(v + "intermediate_layers_indices")),
        )

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_pos(self) -> int:
        """Tokens of a tile: its patches and the class token."""
        return self.n_patches + 1

    @property
    def n_padded(self) -> int:
        return -(-self.n_pos // 8) * 8

    @property
    def n_out(self) -> int:
        return self.n_embd * (1 + len(self.intermediate))


class Layer:
    """Pre-norm encoder layer, LayerNorm with bias, exact GELU; the global layers' outputs
    are scaled by their gates (stored as tanh(gate))."""

    def __init__(self, w: Weights, cfg: VisionConfig, gated: bool) -> None:
        d, ff = cfg.n_embd, cfg.n_ff
        self.attn_norm = LayerNorm.bind(w, "attn_norm", d, cfg.eps)
        self.attn_q = Linear.bind(w, "attn_q", d, d)
        self.attn_k = Linear.bind(w, "attn_k", d, d)
        self.attn_v = Linear.bind(w, "attn_v", d, d)
        self.attn_output = Linear.bind(w, "attn_output", d, d)
        self.ffn_norm = LayerNorm.bind(w, "ffn_norm", d, cfg.eps)
        self.ffn_up = Linear.bind(w, "ffn_up", ff, d, bias=True)
        self.ffn_down = Linear.bind(w, "ffn_down", d, ff, bias=True)
        self.attn_gate = w.get("attn_gate", (1,)) if gated else None
        self.ffn_gate = w.get("ffn_gate", (1,)) if gated else None
        self.cfg = cfg

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        cfg, s = self.cfg, x.shape[0]
        hd = cfg.n_embd // cfg.n_head
        h = self.attn_norm.forward(x)
        q = self.attn_q.forward(h).reshape(s, cfg.n_head, hd)
        k = self.attn_k.forward(h).reshape(s, cfg.n_head, hd)
        v = self.attn_v.forward(h).reshape(s, cfg.n_head, hd)
        h = self.attn_output.forward(
            attention(q, k, v, 1.0 / math.sqrt(hd), None, mask=mask, fused=True)
        )
        x = x.add(h.mul(self.attn_gate) if self.attn_gate is not None else h)
        h = self.ffn_down.forward(self.ffn_up.forward(self.ffn_norm.forward(x)).gelu_erf())
        return x.add(h.mul(self.ffn_gate) if self.ffn_gate is not None else h)


class AspectRatioEmbedding:
    """One (n_embd,) vector per tile, chosen by the aspect-ratio id, scaled by its gate."""

    def __init__(self, w: Weights, name: str, cfg: VisionConfig, n_ratios: int) -> None:
        self.weight = w.get(f"{name}.weight", (n_ratios, cfg.max_tiles * cfg.n_embd))
        self.gate = w.get(f"{name}.gate", (1,))
        self.cfg = cfg

    def forward(self, x: Tensor, ratio: Tensor) -> Tensor:
        """x (tiles, tokens, D) + the tiles' embeddings."""
        cfg = self.cfg
        e = self.weight.get_rows(ratio).reshape(cfg.max_tiles, 1, cfg.n_embd)
        return x.add(e.mul(self.gate).repeat(*x.shape))


class VisionModel:
    def __init__(self, w: Weights, cfg: VisionConfig, n_text: int) -> None:
        d, m, p = cfg.n_embd, cfg.max_tiles, cfg.n_pos
        self.patch_embd = w.get(
            "patch_embd.weight", (d, cfg.channels, cfg.patch_size, cfg.patch_size)
        )
        self.class_embd = w.get("class_embd", (d,))
        n_ratios = w.backend.weight("v.pre_tile_position_embd.weight").shape[0]
        self.pre_tile = AspectRatioEmbedding(w, "pre_tile_position_embd", cfg, n_ratios)
        self.post_tile = AspectRatioEmbedding(w, "post_tile_position_embd", cfg, n_ratios)
        self.position_embd = w.get("position_embd.weight", (p, d))
        self.position_gate = w.get("position_embd.gate", (1,))  # 1 - tanh(gate)
        self.tile_position_embd = w.get("tile_position_embd.weight", (n_ratios, m * p * d))
        self.tile_position_gate = w.get("tile_position_embd.gate", (1,))  # tanh(gate)
        self.pre_ln = LayerNorm.bind(w, "pre_ln", d, PRE_POST_EPS)
        self.post_ln = LayerNorm.bind(w, "post_ln", d, PRE_POST_EPS)
        self.blk = [Layer(w.scope(f"blk.{i}"), cfg, False) for i in range(cfg.n_layer)]
        self.global_blk = [
            Layer(w.scope(f"global.blk.{i}"), cfg, True) for i in range(cfg.n_global)
        ]
        self.cfg, self.n_ratios = cfg, n_ratios

    def mask(self, n_tiles: int) -> np.ndarray:
        """(S, S) over the padded tokens of all tiles: -inf between two padding tokens."""
        cfg = self.cfg
        pad = np.zeros((cfg.max_tiles, cfg.n_padded), dtype=bool)
        pad[n_tiles:] = True
        pad[:, cfg.n_pos :] = True
        pad = pad.reshape(-1)
        return np.where(pad[:, None] & pad[None, :], np.float32(-np.inf), np.float32(0))

    def forward(self, ctx: Context, tiles: Tiles) -> Tensor:
        """Features (max_tiles * n_pos, n_out) of the image's tiles, padded tiles too."""
        cfg = self.cfg
        d, m, p, pp = cfg.n_embd, cfg.max_tiles, cfg.n_pos, cfg.n_padded
        if not 1 <= tiles.aspect_ratio_id < self.n_ratios or tiles.n_tiles > m:
            raise ValueError(f"mllama: {tiles.aspect_ratio} tiles for at most {m}")
        pixels, _ = tiles.padded(m)  # (M, C, H, W), zero tiles after the image's
        ratio = ctx.input(np.array([tiles.aspect_ratio_id], np.int32), DType.I32)
        x = ctx.input(pixels).conv2d(
            self.patch_embd, stride=(cfg.patch_size,) * 2, padding=(0, 0), dilation=(1, 1)
        )  # (M, D, h, w)
        x = x.reshape(m, d, cfg.n_patches).permute(0, 2, 1).contiguous()  # (M, N, D)
        x = self.pre_tile.forward(x, ratio)
        x = ctx.attach(self.class_embd).reshape(1, 1, d).repeat(m, 1, d).concat(x, 1)  # (M, P, D)
        x = x.add(ctx.attach(self.position_embd).mul(self.position_gate))
        tile_pos = self.tile_position_embd.get_rows(ratio).reshape(m, p, d)
        x = x.add(tile_pos.mul(self.tile_position_gate))
        x = self.pre_ln.forward(x)
        if pp > p:
            x = x.concat(ctx.input(np.zeros((m, pp - p, d), np.float32)), 1)  # (M, PP, D)
        x = x.reshape(m * pp, d)
        mask = ctx.input(self.mask(tiles.n_tiles))
        features: list[Tensor] = []
        for i, layer in enumerate(self.blk):
            if i in cfg.intermediate:
                features.append(x)
            x = layer.forward(x, mask)
        if cfg.n_layer in cfg.intermediate:
            features.append(x)
        x = self.post_ln.forward(x)
        x = self.post_tile.forward(x.reshape(m, pp, d), ratio).reshape(m * pp, d)
        for layer in self.global_blk:
            x = layer.forward(x, mask)
        if features:  # (S, D, n) flattened: feature by feature, as torch.stack(dim=-1)
            stack = features[0].reshape(m * pp, d, 1)
            for f in features[1:]:
                stack = stack.concat(f.reshape(m * pp, d, 1), 2)
            x = x.concat(stack.reshape(m * pp, d * len(features)), 1)  # (S, n_out)
        x = x.reshape(m, pp, cfg.n_out)
        if pp > p:
            x = x.slice(1, 0, p)
        return x.contiguous().reshape(m * p, cfg.n_out)
