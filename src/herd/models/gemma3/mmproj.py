"""Gemma 3 in llama.cpp's two files (`herd convert --mmproj`): the converter's hooks for
the text GGUF and the projector GGUF, built on `gemma3/convert.py`.

The text GGUF is exactly the single file's text part (no `v.*`/`mm.*` tensors, no
vision keys: llama.cpp refuses tensors it does not know); the projector GGUF is in
llama.cpp's clip layout (`general.architecture` "clip", `clip.*` keys, gguf-py's tensor
names, `vision.CLIP`), as llama.cpp's Gemma3VisionModel converter writes it: the same
arrays (the projection matrix in transformers' (vision, text) layout, the soft-embedding
norm with `1 + w`), the projection and the patch and position embeddings kept in F16/F32
as llama.cpp keeps them.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFType, Keys

from herd.errors import UnsupportedModelError
from herd.models.gemma3.convert import (
    ARCH,
    _text_shapes,
    _vision_kv,
    _vision_shapes,
    dir_kv,
    gguf_name,
    has_vision,
    tensor,
    text_config,
    text_kv,
    tokenizer_kv,
    tokens_per_image,
    vision_config,
    vocab_config,
)
from herd.models.gemma3.vision import CLIP, CLIP_PROJECTOR_TYPE, OLLAMA

_Q = GGMLQuantizationType
_CV = Keys.ClipVision
_TO_CLIP = {getattr(OLLAMA, f.name): getattr(CLIP, f.name) for f in fields(OLLAMA)}


def clip_name(name: str) -> str:
    """The projector file's name of an Ollama-layout `v.*`/`mm.*` tensor."""
    scope, rest = name.split(".", 1)
    if scope == "v" and rest.startswith("blk."):
        _, i, rest = rest.split(".", 2)
        scope = f"v.blk.{i}"
    stem, suffix = rest.rsplit(".", 1)
    return f"{scope}.{_TO_CLIP[stem]}.{suffix}"


def _is_text(name: str) -> bool:
    return not name.startswith(("v.", "mm."))


def _text_gguf_name(cfg: dict[str, Any], hf_name: str) -> str | None:
    name = gguf_name(cfg, hf_name)
    return name if name is not None and _is_text(name) else None


def _text_tensor(
    cfg: dict[str, Any], hf_name: str, array: np.ndarray
) -> tuple[str, np.ndarray] | None:
    done = tensor(cfg, hf_name, array)
    return done if done is not None and _is_text(done[0]) else None


def _clip_kv(cfg: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's MmprojModel and Gemma3VisionModel keys."""
    vc, n_embd_text = vision_config(cfg), text_config(cfg)["hidden_size"]
    _vision_kv(cfg)  # the same checks: a square grid pooled into whole windows
    if vc["num_channels"] != 3:
        raise UnsupportedModelError(
            f"gemma3: {vc['num_channels']} image channels: llama.cpp's projector takes RGB"
        )
    side = vc["image_size"] // vc["patch_size"]
    return {
        Keys.General.TYPE: GGUFType.MMPROJ,
        Keys.Clip.PROJECTOR_TYPE: CLIP_PROJECTOR_TYPE,
        Keys.Clip.HAS_VISION_ENCODER: True,
        _CV.USE_GELU: True,
        _CV.PROJECTION_DIM: n_embd_text,
        _CV.IMAGE_SIZE: vc["image_size"],
        _CV.PATCH_SIZE: vc["patch_size"],
        _CV.EMBEDDING_LENGTH: vc["hidden_size"],
        _CV.FEED_FORWARD_LENGTH: vc["intermediate_size"],
        _CV.BLOCK_COUNT: vc["num_hidden_layers"],
        _CV.Attention.HEAD_COUNT: vc["num_attention_heads"],
        _CV.Attention.LAYERNORM_EPS: float(vc["layer_norm_eps"]),
        # clip.cpp pools 4x4 windows unless told (llama.cpp writes it only then; always here)
        _CV.Projector.SCALE_FACTOR: side // math.isqrt(tokens_per_image(cfg)),
    }


def _clip_dir_kv(cfg: dict[str, Any], src: Path) -> dict[str, Any]:
    ours = dir_kv(cfg, src)
    return {
        _CV.IMAGE_MEAN: ours[f"{ARCH}.vision.image_mean"],
        _CV.IMAGE_STD: ours[f"{ARCH}.vision.image_std"],
    }


def _clip_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {clip_name(name): shape for name, shape in _vision_shapes(cfg).items()}


def _clip_gguf_name(cfg: dict[str, Any], hf_name: str) -> str | None:
    name = gguf_name(cfg, hf_name)
    return None if name is None or _is_text(name) else clip_name(name)


def _clip_tensor(
    cfg: dict[str, Any], hf_name: str, array: np.ndarray
) -> tuple[str, np.ndarray] | None:
    done = tensor(cfg, hf_name, array)  # the soft-embedding norm's 1 + w included
    if done is None or _is_text(done[0]):
        return None
    return clip_name(done[0]), done[1]


_CLIP_F32 = (f"v.{CLIP.patch_embedding}.weight", f"v.{CLIP.position_embedding}.weight")


def _clip_tensor_qtype(
    name: str, shape: tuple[int, ...], main: GGMLQuantizationType
) -> GGMLQuantizationType | None:
    """llama.cpp's Gemma3VisionModel: the embeddings in F32, the projection in F16 (a
    quantized one breaks some backends: llama.cpp issue 13025); else the driver's rule."""
    if name in _CLIP_F32:
        return _Q.F32
    if name == f"mm.{CLIP.input_projection}.weight":
        return _Q.F32 if main == _Q.F32 else _Q.F16
    return None


def parts(cfg: dict[str, Any]) -> tuple[SimpleNamespace, SimpleNamespace] | None:
    """The text part and the projector part, each with the driver's contract; None for a
    checkpoint without the vision tower."""
    if not has_vision(cfg):
        return None
    text = SimpleNamespace(
        ARCH=ARCH,
        kv=text_kv,
        tensor_shapes=lambda c: _text_shapes(text_config(c)),
        gguf_name=_text_gguf_name,
        tensor=_text_tensor,
        tokenizer_kv=tokenizer_kv,
        vocab_config=vocab_config,
    )
    projector = SimpleNamespace(
        ARCH="clip",
        has_vocab=False,
        kv=_clip_kv,
        dir_kv=_clip_dir_kv,
        tensor_shapes=_clip_shapes,
        gguf_name=_clip_gguf_name,
        tensor=_clip_tensor,
        tensor_qtype=_clip_tensor_qtype,
    )
    return text, projector
