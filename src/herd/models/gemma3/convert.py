"""Hugging Face Gemma 3 text checkpoints (Gemma3ForCausalLM) -> GGUF tensors and metadata.

Gemma's RMSNorm multiplies by `1 + w`; the GGUF stores `1 + w` (folded here, as llama.cpp's
converter does), so the model's norms are plain RMSNorms. Rotary embeddings are NeoX style
(HF's layout): nothing is permuted. Local (sliding-window) and global layers follow
`layer_types` (or the older `sliding_window_pattern`); both are written per layer.
The driver contract (names, shapes, hooks) is described in `herd/convert/driver.py`.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from herd.errors import UnsupportedModelError

ARCH = "gemma3"
HF_ARCHITECTURES = ("Gemma3ForCausalLM",)

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


def kv(cfg: dict[str, Any]) -> dict[str, Any]:
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


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
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


def gguf_name(cfg: dict[str, Any], hf_name: str) -> str | None:
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    for pattern, repl in _NAMES:
        if re.fullmatch(pattern, hf_name):
            name = re.sub(pattern, repl, hf_name)
            return None if name == "output.weight" and _tied(cfg) else name
    raise KeyError(f"{hf_name}: not a gemma3 tensor")


def tensor(cfg: dict[str, Any], hf_name: str, array: np.ndarray) -> tuple[str, np.ndarray] | None:
    name = gguf_name(cfg, hf_name)
    if name is None:
        return None
    if name.endswith("norm.weight"):
        array = array + np.float32(1.0)  # Gemma3RMSNorm: x * (1 + w)
    return name, array
