"""Hugging Face Qwen2 / Qwen2.5 checkpoints -> GGUF tensors and metadata.

Unlike llama, nothing is permuted: the qwen2 GGUF architecture uses NeoX-style rotary
embeddings (halves), which is HF's own layout. Q, K and V carry biases.
The driver contract (names, shapes, hooks) is described in `herd/convert/driver.py`.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

ARCH = "qwen2"
HF_ARCHITECTURES = ("Qwen2ForCausalLM",)

_NAMES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"blk.\1.attn_q.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"blk.\1.attn_k.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"blk.\1.attn_v.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"blk.\1.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"blk.\1.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"blk.\1.ffn_down.weight"),
]


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 nests rope settings in `rope_parameters`; 4.x used rope_scaling."""
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 1000000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _tied(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("tie_word_embeddings", False))


def kv(cfg: dict[str, Any]) -> dict[str, Any]:
    rope = _rope_params(cfg)
    n_head = cfg["num_attention_heads"]
    out: dict[str, Any] = {
        "general.architecture": ARCH,
        f"{ARCH}.block_count": cfg["num_hidden_layers"],
        f"{ARCH}.context_length": cfg.get("max_position_embeddings", 32768),
        f"{ARCH}.embedding_length": cfg["hidden_size"],
        f"{ARCH}.feed_forward_length": cfg["intermediate_size"],
        f"{ARCH}.attention.head_count": n_head,
        f"{ARCH}.attention.head_count_kv": cfg.get("num_key_value_heads") or n_head,
        f"{ARCH}.attention.layer_norm_rms_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
        f"{ARCH}.rope.freq_base": float(rope["rope_theta"]),
        f"{ARCH}.rope.dimension_count": head_dim(cfg),
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
    d, ff, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n_head = cfg["num_attention_heads"]
    n_kv, hd = cfg.get("num_key_value_heads") or n_head, head_dim(cfg)
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)}
    if not _tied(cfg):
        out["output.weight"] = (vocab, d)
    for i in range(cfg["num_hidden_layers"]):
        b = f"blk.{i}."
        out.update(
            {
                b + "attn_norm.weight": (d,),
                b + "ffn_norm.weight": (d,),
                b + "attn_q.weight": (n_head * hd, d),
                b + "attn_q.bias": (n_head * hd,),
                b + "attn_k.weight": (n_kv * hd, d),
                b + "attn_k.bias": (n_kv * hd,),
                b + "attn_v.weight": (n_kv * hd, d),
                b + "attn_v.bias": (n_kv * hd,),
                b + "attn_output.weight": (d, n_head * hd),
                b + "ffn_gate.weight": (ff, d),
                b + "ffn_up.weight": (ff, d),
                b + "ffn_down.weight": (d, ff),
            }
        )
    return out


def gguf_name(cfg: dict[str, Any], hf_name: str) -> str | None:
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    for pattern, repl in _NAMES:
        if re.fullmatch(pattern, hf_name):
            name = re.sub(pattern, repl, hf_name)
            return None if name == "output.weight" and _tied(cfg) else name
    raise KeyError(f"{hf_name}: not a qwen2 tensor")


def tensor(cfg: dict[str, Any], hf_name: str, array: np.ndarray) -> tuple[str, np.ndarray] | None:
    name = gguf_name(cfg, hf_name)
    return None if name is None else (name, array)
