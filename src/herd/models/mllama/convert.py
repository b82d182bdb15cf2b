"""Hugging Face `MllamaForConditionalGeneration` (Llama 3.2 Vision) -> one GGUF, text and
vision together, in Ollama's single-file mllama layout.

The text model is a Llama 3 decoder converted as `llama/convert.py` converts one (names,
the Q/K rotary permutation, `rope_freqs`), with the `llama.` keys renamed `mllama.`, and
cross-attention layers at `mllama.attention.cross_attention_layers`: `cross_attn_*`
tensors and two raw tanh gates (`cross_attn_attn_gate`, `cross_attn_mlp_gate`, no
`.weight`). `token_embd` keeps the 8 extra rows transformers gives it (the image token's
among them); `output` has the text vocabulary's rows only.

The vision tower goes under `v.` and the projector is `mm.0`. As in Ollama's files, the
vision gates are stored already through their tanh: `v.position_embd.gate` holds
1 - tanh(g) and `v.tile_position_embd.gate` tanh(g) (both from the one HF gate),
`v.{pre,post}_tile_position_embd.gate` and the global layers' `attn_gate`/`ffn_gate`
hold tanh(g). The vision Q/K rows get the rotary permutation too (Ollama does it; it
changes no attention score, as Q and K are permuted alike).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import numpy as np

from herd.errors import UnsupportedModelError
from herd.models.conversion import TensorRef
from herd.models.llama import convert as llama

ARCH = "mllama"
HF_ARCHITECTURES = ("MllamaForConditionalGeneration",)

# checkpoints name the text model `language_model.model.` (Meta's HF upload, what
# save_pretrained writes) or `model.language_model.` (transformers' in-memory names)
_TEXT = re.compile(r"(?:model\.)?language_model\.(?:model\.)?")
_HEAD = re.compile(r"(?:language_model\.)?lm_head\.weight")
_VISION = re.compile(r"(?:model\.)?vision_model\.")
_PROJECTOR = re.compile(r"(?:model\.)?multi_modal_projector\.(weight|bias)")
# the second GGUF gate made from the HF position-embedding gate (see tensor_refs)
_TILE_GATE = "vision_model.gated_positional_embedding.tile_gate"

_CROSS = [
    (r"layers\.(\d+)\.cross_attn\.(q|k|v|o)_proj\.weight", r"blk.\1.cross_attn_\2_proj.weight"),
    (r"layers\.(\d+)\.cross_attn\.(q|k)_norm\.weight", r"blk.\1.cross_attn_\2_norm.weight"),
    (r"layers\.(\d+)\.cross_attn_(attn|mlp)_gate", r"blk.\1.cross_attn_\2_gate"),
]
_V_LAYER = [
    (r"input_layernorm\.(weight|bias)", r"attn_norm.\1"),
    (r"post_attention_layernorm\.(weight|bias)", r"ffn_norm.\1"),
    (r"self_attn\.q_proj\.weight", "attn_q.weight"),
    (r"self_attn\.k_proj\.weight", "attn_k.weight"),
    (r"self_attn\.v_proj\.weight", "attn_v.weight"),
    (r"self_attn\.o_proj\.weight", "attn_output.weight"),
    (r"mlp\.fc1\.(weight|bias)", r"ffn_up.\1"),
    (r"mlp\.fc2\.(weight|bias)", r"ffn_down.\1"),
    (r"gate_attn", "attn_gate"),
    (r"gate_ffn", "ffn_gate"),
]
_V_TOP = {
    "patch_embedding.weight": "v.patch_embd.weight",
    "class_embedding": "v.class_embd",
    "gated_positional_embedding.embedding": "v.position_embd.weight",
    "gated_positional_embedding.gate": "v.position_embd.gate",
    "gated_positional_embedding.tile_gate": "v.tile_position_embd.gate",
    "gated_positional_embedding.tile_embedding.weight": "v.tile_position_embd.weight",
    "pre_tile_positional_embedding.embedding.weight": "v.pre_tile_position_embd.weight",
    "pre_tile_positional_embedding.gate": "v.pre_tile_position_embd.gate",
    "post_tile_positional_embedding.embedding.weight": "v.post_tile_position_embd.weight",
    "post_tile_positional_embedding.gate": "v.post_tile_position_embd.gate",
    "layernorm_pre.weight": "v.pre_ln.weight",
    "layernorm_pre.bias": "v.pre_ln.bias",
    "layernorm_post.weight": "v.post_ln.weight",
    "layernorm_post.bias": "v.post_ln.bias",
}
_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "attention_heads": 16,
    "num_hidden_layers": 32,
    "num_global_layers": 8,
    "image_size": 560,
    "patch_size": 14,
    "num_channels": 3,
    "max_num_tiles": 4,
    "norm_eps": 1e-5,
    "hidden_act": "gelu",
    "intermediate_layers_indices": [3, 7, 15, 23, 30],
}


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(cfg["text_config"])


def vision_config(cfg: dict[str, Any]) -> dict[str, Any]:
    vc = {**_VISION_DEFAULTS, **cfg["vision_config"]}
    if vc["hidden_act"] != "gelu":
        raise UnsupportedModelError(f"mllama: vision hidden_act {vc['hidden_act']!r}")
    n = int(vc["max_num_tiles"])
    ratios = [[h, w] for h in range(1, n + 1) for w in range(1, n + 1) if h * w <= n]
    if vc.get("supported_aspect_ratios", ratios) != ratios:
        # the runner derives the canvases from max_num_tiles, as Ollama and transformers do
        raise UnsupportedModelError(
            f"mllama: supported_aspect_ratios {vc['supported_aspect_ratios']} are not the "
            f"canvases of up to {n} tiles"
        )
    return vc


def image_token(cfg: dict[str, Any]) -> int:
    return int(cfg.get("image_token_index", cfg.get("image_token_id", 128256)))


def vocab_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The vocabulary holds the image token (`<|image|>`, 128256), one past the text
    model's `vocab_size` in Llama 3.2 Vision."""
    tc = text_config(cfg)
    return {**tc, "vocab_size": max(int(tc["vocab_size"]), image_token(cfg) + 1)}


def _num_patches(vc: dict[str, Any]) -> int:
    return (vc["image_size"] // vc["patch_size"]) ** 2 + 1  # and the class embedding


def kv(cfg: dict[str, Any]) -> dict[str, Any]:
    tc, vc = text_config(cfg), vision_config(cfg)
    if image_token(cfg) != tc["vocab_size"]:
        # the runner takes <|image|> to be the first embedding row past the text
        # vocabulary, as Ollama's fixed 128256 is for Llama 3.2 Vision
        raise UnsupportedModelError(
            f"mllama: image token {image_token(cfg)} is not the text vocabulary's size "
            f"{tc['vocab_size']}"
        )
    out = {k.replace("llama.", "mllama.", 1): v for k, v in llama.kv(tc).items()}
    out["general.architecture"] = ARCH
    v = f"{ARCH}.vision."
    out.update(
        {
            f"{ARCH}.attention.cross_attention_layers": list(tc["cross_attention_layers"]),
            v + "block_count": vc["num_hidden_layers"],
            v + "global.block_count": vc["num_global_layers"],
            v + "intermediate_layers_indices": list(vc["intermediate_layers_indices"]),
            v + "embedding_length": vc["hidden_size"],
            v + "feed_forward_length": vc["intermediate_size"],
            v + "attention.head_count": vc["attention_heads"],
            v + "attention.layer_norm_epsilon": float(vc["norm_eps"]),
            v + "image_size": vc["image_size"],
            v + "patch_size": vc["patch_size"],
            v + "max_num_tiles": vc["max_num_tiles"],
            v + "num_channels": vc["num_channels"],
        }
    )
    return out


def _vision_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    vc, d_text = vision_config(cfg), text_config(cfg)["hidden_size"]
    d, ff, p, c = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"], vc["num_channels"]
    tiles, n_pos = vc["max_num_tiles"], _num_patches(vc)
    n_ratios = len([1 for h in range(1, tiles + 1) for w in range(1, tiles + 1) if h * w <= tiles])
    out_dim = d * (1 + len(vc["intermediate_layers_indices"]))
    out: dict[str, tuple[int, ...]] = {
        "v.patch_embd.weight": (d, c, p, p),
        "v.class_embd": (d,),
        "v.position_embd.weight": (n_pos, d),
        "v.position_embd.gate": (1,),
        "v.tile_position_embd.gate": (1,),
        "v.tile_position_embd.weight": (n_ratios + 1, tiles * n_pos * d),
        "mm.0.weight": (d_text, out_dim),
        "mm.0.bias": (d_text,),
    }
    for where in ("pre", "post"):
        out[f"v.{where}_tile_position_embd.weight"] = (n_ratios + 1, tiles * d)
        out[f"v.{where}_tile_position_embd.gate"] = (1,)
        out[f"v.{where}_ln.weight"] = (d,)
        out[f"v.{where}_ln.bias"] = (d,)
    layer = {
        "attn_norm.weight": (d,),
        "attn_norm.bias": (d,),
        "ffn_norm.weight": (d,),
        "ffn_norm.bias": (d,),
        "attn_q.weight": (d, d),
        "attn_k.weight": (d, d),
        "attn_v.weight": (d, d),
        "attn_output.weight": (d, d),
        "ffn_up.weight": (ff, d),
        "ffn_up.bias": (ff,),
        "ffn_down.weight": (d, ff),
        "ffn_down.bias": (d,),
    }
    for i in range(vc["num_hidden_layers"]):
        out.update({f"v.blk.{i}.{k}": s for k, s in layer.items()})
    for i in range(vc["num_global_layers"]):
        out.update({f"v.global.blk.{i}.{k}": s for k, s in layer.items()})
        out[f"v.global.blk.{i}.attn_gate"] = (1,)
        out[f"v.global.blk.{i}.ffn_gate"] = (1,)
    return out


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    tc = text_config(cfg)
    out = llama.tensor_shapes(tc)
    d, n_head = tc["hidden_size"], tc["num_attention_heads"]
    n_kv, hd = tc.get("num_key_value_heads") or n_head, llama.head_dim(tc)
    out["token_embd.weight"] = (tc["vocab_size"] + 8, d)  # the image token's rows
    for i in tc["cross_attention_layers"]:
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            del out[f"blk.{i}.{name}.weight"]
        out.update(
            {
                f"blk.{i}.cross_attn_q_proj.weight": (n_head * hd, d),
                f"blk.{i}.cross_attn_k_proj.weight": (n_kv * hd, d),
                f"blk.{i}.cross_attn_v_proj.weight": (n_kv * hd, d),
                f"blk.{i}.cross_attn_o_proj.weight": (d, n_head * hd),
                f"blk.{i}.cross_attn_q_norm.weight": (hd,),
                f"blk.{i}.cross_attn_k_norm.weight": (hd,),
                f"blk.{i}.cross_attn_attn_gate": (1,),
                f"blk.{i}.cross_attn_mlp_gate": (1,),
            }
        )
    out.update(_vision_shapes(cfg))
    return out


def extra_tensors(cfg: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    return llama.extra_tensors(text_config(cfg))


def tensor_refs(cfg: dict[str, Any], refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """The one HF position-embedding gate makes two GGUF gates (see the module doc)."""
    for name, ref in list(refs.items()):
        if _VISION.sub("vision_model.", name, count=1) == (
            "vision_model.gated_positional_embedding.gate"
        ):
            refs[_TILE_GATE] = replace(ref, name=_TILE_GATE)
    return refs


def _pairs(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rotary rows of each head from HF's two halves to GGUF's interleaved pairs."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_name(cfg: dict[str, Any], hf_name: str) -> str | None:
    if _HEAD.fullmatch(hf_name):
        return "output.weight"
    m = _TEXT.match(hf_name)
    if m:
        rest = hf_name[m.end() :]
        for pattern, repl in _CROSS:
            if re.fullmatch(pattern, rest):
                return re.sub(pattern, repl, rest)
        return llama.gguf_name(text_config(cfg), "model." + rest)
    m = _PROJECTOR.fullmatch(hf_name)
    if m:
        return f"mm.0.{m.group(1)}"
    m = _VISION.match(hf_name)
    if m:
        rest = hf_name[m.end() :]
        if rest in _V_TOP:
            return _V_TOP[rest]
        layer = re.fullmatch(r"(global_transformer|transformer)\.layers\.(\d+)\.(.+)", rest)
        if layer:
            where = "v.global.blk" if layer.group(1) == "global_transformer" else "v.blk"
            for pattern, repl in _V_LAYER:
                if re.fullmatch(pattern, layer.group(3)):
                    return f"{where}.{layer.group(2)}.{re.sub(pattern, repl, layer.group(3))}"
    raise KeyError(f"{hf_name}: not an mllama tensor")


def tensor(cfg: dict[str, Any], hf_name: str, array: np.ndarray) -> tuple[str, np.ndarray] | None:
    name = gguf_name(cfg, hf_name)
    if name is None:
        return None
    tc = text_config(cfg)
    n_head = tc["num_attention_heads"]
    if name.startswith("blk.") and name.endswith(".attn_q.weight"):
        return name, _pairs(array, n_head)  # self-attention: rotary pairs
    if name.startswith("blk.") and name.endswith(".attn_k.weight"):
        return name, _pairs(array, tc.get("num_key_value_heads") or n_head)
    if name.startswith("v.") and name.endswith((".attn_q.weight", ".attn_k.weight")):
        return name, _pairs(array, vision_config(cfg)["attention_heads"])
    if name == "v.position_embd.gate":
        return name, (1.0 - np.tanh(array)).astype(np.float32)
    if name.startswith("v.") and name.endswith(("gate", "_gate")):
        return name, np.tanh(array).astype(np.float32)
    return name, array
