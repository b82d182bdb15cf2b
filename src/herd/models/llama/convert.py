"""Hugging Face Llama (and Mistral) checkpoints -> GGUF tensors and metadata.

The renaming and the Q/K row permutation live here, never in `forward`: HF stores rotary
dimensions as two halves (NeoX style), the llama GGUF layout interleaves them in pairs.
The driver contract (names, shapes, hooks) is described in `herd/convert/driver.py`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

ARCH = "llama"
HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

_NAMES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"blk.\1.attn_q.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"blk.\1.attn_k.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"blk.\1.attn_v.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.(weight|bias)", r"blk.\1.ffn_gate.\2"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"blk.\1.ffn_up.\2"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"blk.\1.ffn_down.\2"),
]


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 nests rope settings in `rope_parameters`; 4.x used rope_scaling."""
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _tied(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("tie_word_embeddings", False))


def kv(cfg: dict[str, Any]) -> dict[str, Any]:
    """GGUF metadata for an HF config.json."""
    rope = _rope_params(cfg)
    n_head = cfg["num_attention_heads"]
    out: dict[str, Any] = {
        "general.architecture": ARCH,
        f"{ARCH}.block_count": cfg["num_hidden_layers"],
        f"{ARCH}.context_length": cfg.get("max_position_embeddings", 4096),
        f"{ARCH}.embedding_length": cfg["hidden_size"],
        f"{ARCH}.feed_forward_length": cfg["intermediate_size"],
        f"{ARCH}.attention.head_count": n_head,
        f"{ARCH}.attention.head_count_kv": cfg.get("num_key_value_heads") or n_head,
        f"{ARCH}.attention.layer_norm_rms_epsilon": float(cfg.get("rms_norm_eps", 1e-5)),
        f"{ARCH}.rope.freq_base": float(rope["rope_theta"]),
        f"{ARCH}.rope.dimension_count": head_dim(cfg),
        f"{ARCH}.vocab_size": cfg["vocab_size"],
    }
    if head_dim(cfg) != cfg["hidden_size"] // n_head:
        out[f"{ARCH}.attention.key_length"] = head_dim(cfg)
        out[f"{ARCH}.attention.value_length"] = head_dim(cfg)
    if rope["rope_type"] in ("linear", "yarn"):
        out[f"{ARCH}.rope.scaling.type"] = rope["rope_type"]
        out[f"{ARCH}.rope.scaling.factor"] = float(rope["factor"])
        if "original_max_position_embeddings" in rope:
            out[f"{ARCH}.rope.scaling.original_context_length"] = int(
                rope["original_max_position_embeddings"]
            )
    return out


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every GGUF tensor of the converted file, NumPy order."""
    d, ff, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n_head = cfg["num_attention_heads"]
    n_kv, hd = cfg.get("num_key_value_heads") or n_head, head_dim(cfg)
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)}
    if not _tied(cfg):
        out["output.weight"] = (vocab, d)
    attn = {
        "attn_q": (n_head * hd, d),
        "attn_k": (n_kv * hd, d),
        "attn_v": (n_kv * hd, d),
        "attn_output": (d, n_head * hd),
    }
    mlp = {"ffn_gate": (ff, d), "ffn_up": (ff, d), "ffn_down": (d, ff)}
    for i in range(cfg["num_hidden_layers"]):
        out[f"blk.{i}.attn_norm.weight"] = (d,)
        out[f"blk.{i}.ffn_norm.weight"] = (d,)
        for group, bias in ((attn, cfg.get("attention_bias")), (mlp, cfg.get("mlp_bias"))):
            for name, shape in group.items():
                out[f"blk.{i}.{name}.weight"] = shape
                if bias:
                    out[f"blk.{i}.{name}.bias"] = shape[:1]
    return out


def llama3_rope_factors(cfg: dict[str, Any]) -> np.ndarray | None:
    """Llama 3.1 frequency-dependent scaling, stored as the `rope_freqs` tensor."""
    rope = _rope_params(cfg)
    if rope["rope_type"] != "llama3":
        return None
    dim, base, factor = head_dim(cfg), float(rope["rope_theta"]), float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for freq in 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def extra_tensors(cfg: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    factors = llama3_rope_factors(cfg)
    return [] if factors is None else [("rope_freqs.weight", factors)]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF half-split rotary rows -> interleaved pairs, per head."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(cfg: dict[str, Any], hf_name: str) -> str | None:
    """The GGUF name of an HF tensor; None for tensors GGUF does not keep."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    for pattern, repl in _NAMES:
        if re.fullmatch(pattern, hf_name):
            name = re.sub(pattern, repl, hf_name)
            return None if name == "output.weight" and _tied(cfg) else name
    raise KeyError(f"{hf_name}: not a llama tensor")


def tensor(cfg: dict[str, Any], hf_name: str, array: np.ndarray) -> tuple[str, np.ndarray] | None:
    """(GGUF name, array) for one HF tensor, or None for tensors GGUF does not keep."""
    name = gguf_name(cfg, hf_name)
    if name is None:
        return None
    n_head = cfg["num_attention_heads"]
    if ".attn_q." in name:
        array = _permute(array, n_head)
    elif ".attn_k." in name:
        array = _permute(array, cfg.get("num_key_value_heads") or n_head)
    return name, array
