"""Hugging Face Gemma 3 checkpoints -> GGUF tensors and metadata: text-only
(Gemma3ForCausalLM), or with the SigLIP vision tower and projector
(Gemma3ForConditionalGeneration) in one file, as Ollama lays it out.

Gemma's RMSNorm multiplies by `1 + w`; the GGUF stores `1 + w` (folded here, as llama.cpp's
converter does), so the model's norms are plain RMSNorms. Rotary embeddings are NeoX style
(HF's layout): nothing is permuted. Local (sliding-window) and global layers follow
`layer_types` (or the older `sliding_window_pattern`); both are written per layer.
The driver contract (names, shapes, hooks) is described in `herd/convert/driver.py`.

With vision, the text part is converted exactly as a Gemma3ForCausalLM's (from
`text_config`), and Ollama's names and keys are added: `v.*` (the SigLIP encoder),
`mm.*` (the projector), `gemma3.vision.*` and `gemma3.mm.tokens_per_image`. Like Ollama,
the projector matrix keeps transformers' (vision, text) layout (the model transposes it),
and only the text model's norms and the projector's soft-embedding norm (both
Gemma3RMSNorm) get `1 + w`; SigLIP's LayerNorms are plain. herd adds what Ollama
hard-codes: the image mean/std (`gemma3.vision.image_mean`/`image_std`, from
preprocessor_config.json) and the image token ids (`gemma3.image_token_id`,
`gemma3.boi_token_id`, `gemma3.eoi_token_id`).

With `herd convert --mmproj` the checkpoint goes into llama.cpp's two files instead:
`gemma3/mmproj.py`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from herd.errors import UnsupportedModelError

ARCH = "gemma3"
HF_ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")

_L = r"model\.layers\.(\d+)\."
_NAMES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (_L + r"input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (_L + r"self_attn\.q_proj\.weight", r"blk.\1.attn_q.weight"),
    (_L + r"self_attn\.k_proj\.weight", r"blk.\1.attn_k.weight"),
    (_L + r"self_attn\.v_proj\.weight", r"blk.\1.attn_v.weight"),
    (_L + r"self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (_L + r"self_attn\.q_norm\.weight", r"blk.\1.attn_q_norm.weight"),
    (_L + r"self_attn\.k_norm\.weight", r"blk.\1.attn_k_norm.weight"),
    (_L + r"post_attention_layernorm\.weight", r"blk.\1.post_attention_norm.weight"),
    (_L + r"pre_feedforward_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (_L + r"post_feedforward_layernorm\.weight", r"blk.\1.post_ffw_norm.weight"),
    (_L + r"mlp\.gate_proj\.weight", r"blk.\1.ffn_gate.weight"),
    (_L + r"mlp\.up_proj\.weight", r"blk.\1.ffn_up.weight"),
    (_L + r"mlp\.down_proj\.weight", r"blk.\1.ffn_down.weight"),
]

# Gemma3ForConditionalGeneration: where each part's tensors live, in the layouts the
# checkpoints have (Google's original, transformers 4.5x's `model.*`, transformers 5's)
_TEXT_PREFIX = re.compile(r"(?:model\.)?language_model\.(?:model\.)?")
_VISION_PREFIX = re.compile(r"(?:model\.)?vision_tower\.(?:vision_model\.)?")
_PROJ_PREFIX = re.compile(r"(?:model\.)?multi_modal_projector\.")
_VL = r"encoder\.layers\.(\d+)\."
_P = r"\.(weight|bias)"
_VISION_NAMES = [
    (r"embeddings\.patch_embedding" + _P, r"v.patch_embedding.\1"),
    (r"embeddings\.position_embedding\.weight", "v.position_embedding.weight"),
    (_VL + r"self_attn\.q_proj" + _P, r"v.blk.\1.attn_q.\2"),
    (_VL + r"self_attn\.k_proj" + _P, r"v.blk.\1.attn_k.\2"),
    (_VL + r"self_attn\.v_proj" + _P, r"v.blk.\1.attn_v.\2"),
    (_VL + r"self_attn\.out_proj" + _P, r"v.blk.\1.attn_output.\2"),
    (_VL + r"layer_norm1" + _P, r"v.blk.\1.layer_norm1.\2"),
    (_VL + r"layer_norm2" + _P, r"v.blk.\1.layer_norm2.\2"),
    (_VL + r"mlp\.fc1" + _P, r"v.blk.\1.mlp.fc1.\2"),
    (_VL + r"mlp\.fc2" + _P, r"v.blk.\1.mlp.fc2.\2"),
    (r"post_layernorm" + _P, r"v.post_layernorm.\1"),
]
_PROJ_NAMES = {
    "mm_input_projection_weight": "mm.mm_input_projection.weight",
    "mm_soft_emb_norm.weight": "mm.mm_soft_emb_norm.weight",
}
# what transformers assumes where a Gemma 3 config.json leaves a key out (Google's
# checkpoints leave out many): Gemma3TextConfig's and SiglipVisionConfig's defaults
_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262208,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-6,
    "sliding_window": 4096,
    "max_position_embeddings": 131072,
}
_VISION_DEFAULTS: dict[str, Any] = {
    "num_channels": 3,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
    "vision_use_head": False,
}
# Gemma3Config's defaults for the image tokens (<image_soft_token>, <start_of_image>,
# <end_of_image> in Gemma 3's vocabulary)
_TOKEN_DEFAULTS = {"image_token": 262144, "boi_token": 255999, "eoi_token": 256000}


def has_vision(cfg: dict[str, Any]) -> bool:
    return "vision_config" in cfg


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The text model's config: the whole config.json of a Gemma3ForCausalLM, or a
    Gemma3ForConditionalGeneration's `text_config` with transformers' defaults filled in
    (tying is decided by the top level)."""
    if not has_vision(cfg):
        return cfg
    out = {**_TEXT_DEFAULTS, **(cfg.get("text_config") or {})}
    out["tie_word_embeddings"] = cfg.get(
        "tie_word_embeddings", out.get("tie_word_embeddings", True)
    )
    return out


def vision_config(cfg: dict[str, Any]) -> dict[str, Any]:
    vc = {**_VISION_DEFAULTS, **cfg["vision_config"]}
    if vc["hidden_act"] not in ("gelu_pytorch_tanh", "gelu_new"):
        raise UnsupportedModelError(
            f"gemma3: vision hidden_act {vc['hidden_act']!r} is not supported "
            "(SigLIP's tanh-approximated GELU is)"
        )
    for key in ("image_size", "patch_size"):
        if not isinstance(vc[key], int):
            raise UnsupportedModelError(f"gemma3: vision {key} {vc[key]!r}: only square")
    return vc


def _token_id(cfg: dict[str, Any], name: str) -> int:
    """image_token / boi_token / eoi_token: `<name>_index` (transformers' saved key) or
    `<name>_id`, else Gemma 3's."""
    value = cfg.get(f"{name}_index", cfg.get(f"{name}_id"))
    return int(value if value is not None else _TOKEN_DEFAULTS[name])


def tokens_per_image(cfg: dict[str, Any]) -> int:
    return int(cfg.get("mm_tokens_per_image") or 256)


def head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or 256)


def _tied(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("tie_word_embeddings", True))


def _rope(cfg: dict[str, Any], kind: str) -> dict[str, Any]:
    """Rope settings of "full_attention" or "sliding_attention" layers (transformers 4 or 5)."""
    params = cfg.get("rope_parameters") or {}
    if kind in params:
        return dict(params[kind])
    if kind == "sliding_attention":
        return {"rope_theta": cfg.get("rope_local_base_freq", 10000.0), "rope_type": "default"}
    out = dict(cfg.get("rope_scaling") or {})
    out.setdefault("rope_theta", cfg.get("rope_theta", 1000000.0))
    out.setdefault("rope_type", out.get("type", "default"))
    return out


def sliding_layers(cfg: dict[str, Any]) -> list[bool]:
    """Per layer: True for a local sliding-window layer, False for a global one."""
    n = cfg["num_hidden_layers"]
    if cfg.get("layer_types"):
        return [t == "sliding_attention" for t in cfg["layer_types"]]
    pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
    return [(i + 1) % int(pattern) != 0 for i in range(n)]


def _text_kv(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError("gemma3: attention logit soft-capping is not supported")
    hd, full = head_dim(cfg), _rope(cfg, "full_attention")
    out: dict[str, Any] = {
        "general.architecture": ARCH,
        f"{ARCH}.context_length": cfg.get("max_position_embeddings", 131072),
        f"{ARCH}.embedding_length": cfg["hidden_size"],
        f"{ARCH}.block_count": cfg["num_hidden_layers"],
        f"{ARCH}.feed_forward_length": cfg["intermediate_size"],
        f"{ARCH}.attention.head_count": cfg.get("num_attention_heads", 8),
        f"{ARCH}.attention.head_count_kv": cfg.get("num_key_value_heads", 4),
        f"{ARCH}.attention.layer_norm_rms_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
        f"{ARCH}.attention.key_length": hd,
        f"{ARCH}.attention.value_length": hd,
        f"{ARCH}.rope.freq_base": float(full.get("rope_theta", 1000000.0)),
        # read by herd and Ollama; llama.cpp assumes 10000 for local layers
        f"{ARCH}.rope.local.freq_base": float(
            _rope(cfg, "sliding_attention").get("rope_theta", 10000.0)
        ),
    }
    if full.get("rope_type", "default") == "linear":
        out[f"{ARCH}.rope.scaling.type"] = "linear"
        out[f"{ARCH}.rope.scaling.factor"] = float(full["factor"])
    if cfg.get("final_logit_softcapping"):
        out[f"{ARCH}.final_logit_softcapping"] = float(cfg["final_logit_softcapping"])
    layers = sliding_layers(cfg)
    if any(layers):
        out[f"{ARCH}.attention.sliding_window"] = int(cfg["sliding_window"])
        out[f"{ARCH}.attention.sliding_window_pattern"] = layers
    scalar = cfg.get("query_pre_attn_scalar")
    if scalar is not None and int(scalar) != hd:
        out[f"{ARCH}.attention.query_pre_attn_scalar"] = int(scalar)
    return out


def tokenizer_kv(cfg: dict[str, Any], kv: dict[str, Any]) -> dict[str, Any]:
    """Gemma's SentencePiece vocabulary adds no dummy space prefix."""
    if kv.get("tokenizer.ggml.model") == "llama":
        kv = {**kv, "tokenizer.ggml.add_space_prefix": False}
    return kv


def _text_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, ff, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = head_dim(cfg)
    n_head = cfg.get("num_attention_heads", 8)
    n_kv = cfg.get("num_key_value_heads", 4)
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)}
    if not _tied(cfg):
        out["output.weight"] = (vocab, d)
    for i in range(cfg["num_hidden_layers"]):
        b = f"blk.{i}."
        out.update(
            {
                b + "attn_norm.weight": (d,),
                b + "post_attention_norm.weight": (d,),
                b + "ffn_norm.weight": (d,),
                b + "post_ffw_norm.weight": (d,),
                b + "attn_q.weight": (n_head * hd, d),
                b + "attn_k.weight": (n_kv * hd, d),
                b + "attn_v.weight": (n_kv * hd, d),
                b + "attn_output.weight": (d, n_head * hd),
                b + "attn_q_norm.weight": (hd,),
                b + "attn_k_norm.weight": (hd,),
                b + "ffn_gate.weight": (ff, d),
                b + "ffn_up.weight": (ff, d),
                b + "ffn_down.weight": (d, ff),
            }
        )
    return out


def _text_name(cfg: dict[str, Any], hf_name: str) -> str | None:
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    for pattern, repl in _NAMES:
        if re.fullmatch(pattern, hf_name):
            name = re.sub(pattern, repl, hf_name)
            return None if name == "output.weight" and _tied(cfg) else name
    raise KeyError(f"{hf_name}: not a gemma3 tensor")


def _vision_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    vc, d_text = vision_config(cfg), text_config(cfg)["hidden_size"]
    d, ff, p = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"]
    out: dict[str, tuple[int, ...]] = {
        "v.patch_embedding.weight": (d, vc["num_channels"], p, p),
        "v.patch_embedding.bias": (d,),
        "v.position_embedding.weight": ((vc["image_size"] // p) ** 2, d),
        "v.post_layernorm.weight": (d,),
        "v.post_layernorm.bias": (d,),
        "mm.mm_input_projection.weight": (d, d_text),  # (vision, text): transformers' layout
        "mm.mm_soft_emb_norm.weight": (d,),
    }
    for i in range(vc["num_hidden_layers"]):
        b = f"v.blk.{i}."
        for name, shape in (
            ("attn_q", (d, d)),
            ("attn_k", (d, d)),
            ("attn_v", (d, d)),
            ("attn_output", (d, d)),
            ("mlp.fc1", (ff, d)),
            ("mlp.fc2", (d, ff)),
        ):
            out[f"{b}{name}.weight"], out[f"{b}{name}.bias"] = shape, (shape[0],)
        for name in ("layer_norm1", "layer_norm2"):
            out[f"{b}{name}.weight"] = out[f"{b}{name}.bias"] = (d,)
    return out


def _vision_kv(cfg: dict[str, Any]) -> dict[str, Any]:
    vc, n = vision_config(cfg), tokens_per_image(cfg)
    side, patches = math.isqrt(n), vc["image_size"] // vc["patch_size"]
    if side * side != n or patches % side:
        raise UnsupportedModelError(
            f"gemma3: mm_tokens_per_image {n} does not pool a {patches}x{patches} patch grid "
            "into a square of whole windows"
        )
    v = f"{ARCH}.vision."
    return {
        v + "block_count": vc["num_hidden_layers"],
        v + "embedding_length": vc["hidden_size"],
        v + "feed_forward_length": vc["intermediate_size"],
        v + "image_size": vc["image_size"],
        v + "patch_size": vc["patch_size"],
        v + "num_channels": vc["num_channels"],
        v + "attention.head_count": vc["num_attention_heads"],
        v + "attention.layer_norm_epsilon": float(vc["layer_norm_eps"]),
        f"{ARCH}.mm.tokens_per_image": n,  # Ollama's converter's key
        **{f"{ARCH}.{name}_id": _token_id(cfg, name) for name in _TOKEN_DEFAULTS},
    }


def text_kv(cfg: dict[str, Any]) -> dict[str, Any]:
    """The text model's metadata, whichever the layout."""
    out = _text_kv(text_config(cfg))
    if has_vision(cfg):
        # transformers' Gemma3ForConditionalGeneration never soft-caps its logits (its
        # CausalLM does); Google's checkpoints set none anyway
        out.pop(f"{ARCH}.final_logit_softcapping", None)
    return out


def kv(cfg: dict[str, Any]) -> dict[str, Any]:
    out = text_kv(cfg)
    if has_vision(cfg):
        out.update(_vision_kv(cfg))
    return out


def dir_kv(cfg: dict[str, Any], src: Path) -> dict[str, Any]:
    """The image processor's normalization (preprocessor_config.json; Gemma 3's is 0.5)."""
    if not has_vision(cfg):
        return {}
    path = src / "preprocessor_config.json"
    pre = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {
        f"{ARCH}.vision.image_mean": [float(x) for x in pre.get("image_mean", [0.5] * 3)],
        f"{ARCH}.vision.image_std": [float(x) for x in pre.get("image_std", [0.5] * 3)],
    }


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    out = _text_shapes(text_config(cfg))
    if has_vision(cfg):
        out.update(_vision_shapes(cfg))
    return out


def gguf_name(cfg: dict[str, Any], hf_name: str) -> str | None:
    if not has_vision(cfg):
        return _text_name(cfg, hf_name)
    if re.fullmatch(r"(?:language_model\.)?lm_head\.weight", hf_name):
        return _text_name(text_config(cfg), "lm_head.weight")
    if m := _TEXT_PREFIX.match(hf_name):
        return _text_name(text_config(cfg), "model." + hf_name[m.end() :])
    if m := _VISION_PREFIX.match(hf_name):
        rest = hf_name[m.end() :]
        if rest.startswith("head."):
            return None  # SigLIP's pooling head: Gemma 3 takes the patches themselves
        for pattern, repl in _VISION_NAMES:
            if re.fullmatch(pattern, rest):
                return re.sub(pattern, repl, rest)
    if (m := _PROJ_PREFIX.match(hf_name)) and hf_name[m.end() :] in _PROJ_NAMES:
        return _PROJ_NAMES[hf_name[m.end() :]]
    raise KeyError(f"{hf_name}: not a gemma3 tensor")


def tensor(cfg: dict[str, Any], hf_name: str, array: np.ndarray) -> tuple[str, np.ndarray] | None:
    name = gguf_name(cfg, hf_name)
    if name is None:
        return None
    # Gemma3RMSNorm: x * (1 + w), in the text model and the projector; SigLIP's are LayerNorms
    if name.endswith("norm.weight") and not name.startswith("v."):
        array = array + np.float32(1.0)
    return name, array


def vocab_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The vocabulary is the text model's (its vocab_size pads the token table)."""
    return text_config(cfg)


def mmproj(cfg: dict[str, Any]) -> tuple[SimpleNamespace, SimpleNamespace] | None:
    """llama.cpp's two-file layout (`herd convert --mmproj`): `gemma3/mmproj.py`, imported
    here when asked for (it builds on this module)."""
    from herd.models.gemma3.mmproj import parts

    return parts(cfg)
