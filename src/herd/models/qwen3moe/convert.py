"""Hugging Face Qwen3 MoE checkpoints -> GGUF tensors and metadata.

Attention is qwen3's (QK-norm, no permutation). Each layer's feed-forward is a router
(`mlp.gate`, GGUF `ffn_gate_inp`) and experts stacked into one tensor per projection
(`ffn_gate_exps`, `ffn_up_exps`: (E, F, D); `ffn_down_exps`: (E, D, F)), as llama.cpp
names them. Checkpoints come in two layouts, both regrouped by `tensor_refs`: one matrix
per expert (`mlp.experts.{e}.gate_proj.weight`, the hub's and what transformers 5 saves)
or fused (`mlp.experts.gate_up_proj` (E, 2F, D) and `mlp.experts.down_proj` (E, D, F), the
layout of transformers 5 in memory).

Refused: dense layers between the sparse ones (`decoder_sparse_step` > 1, `mlp_only_layers`)
and `norm_topk_prob: false`, since llama.cpp's qwen3moe always renormalizes the chosen
experts' weights and reads no key that would say otherwise.
The driver contract (names, shapes, hooks) is described in `herd/convert/driver.py`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from herd.errors import ConvertError, UnsupportedModelError
from herd.models.conversion import FLOAT_DTYPES, TensorRef

ARCH = "qwen3moe"
HF_ARCHITECTURES = ("Qwen3MoeForCausalLM",)

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
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", r"blk.\1.attn_q_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", r"blk.\1.attn_k_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", r"blk.\1.ffn_gate_inp.weight"),
    # the stacked experts, as `tensor_refs` names them
    (r"model\.layers\.(\d+)\.mlp\.experts\.gate_proj", r"blk.\1.ffn_gate_exps.weight"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.up_proj", r"blk.\1.ffn_up_exps.weight"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.down_proj", r"blk.\1.ffn_down_exps.weight"),
]
_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_GATE_UP = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj(?:\.weight)?")
_DOWN = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.down_proj(?:\.weight)?")


def n_expert(cfg: dict[str, Any]) -> int:
    """transformers 5 saves `num_experts` as `num_local_experts` (an attribute alias)."""
    return int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)


def _check(cfg: dict[str, Any]) -> None:
    if n_expert(cfg) <= 0 or not 0 < cfg.get("num_experts_per_tok", 0) <= n_expert(cfg):
        raise UnsupportedModelError(
            f"qwen3moe: needs 1 <= num_experts_per_tok <= num_experts, got "
            f"{cfg.get('num_experts_per_tok')} of {n_expert(cfg)}"
        )
    dense = sorted(
        set(cfg.get("mlp_only_layers") or [])
        | {
            i
            for i in range(cfg["num_hidden_layers"])
            if (i + 1) % int(cfg.get("decoder_sparse_step", 1)) != 0
        }
    )
    if dense:
        raise UnsupportedModelError(
            f"qwen3moe: layers {dense} have a dense MLP (decoder_sparse_step / "
            "mlp_only_layers); only all-sparse models are supported, as in llama.cpp"
        )
    if not cfg.get("norm_topk_prob", False):
        raise UnsupportedModelError(
            "qwen3moe: norm_topk_prob false is not supported: llama.cpp's qwen3moe always "
            "renormalizes the chosen experts' weights, so the file would run differently there"
        )


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
    _check(cfg)
    rope = _rope_params(cfg)
    n_head = cfg["num_attention_heads"]
    out: dict[str, Any] = {
        "general.architecture": ARCH,
        f"{ARCH}.block_count": cfg["num_hidden_layers"],
        f"{ARCH}.context_length": cfg.get("max_position_embeddings", 32768),
        f"{ARCH}.embedding_length": cfg["hidden_size"],
        f"{ARCH}.feed_forward_length": cfg.get("intermediate_size", cfg["moe_intermediate_size"]),
        f"{ARCH}.expert_feed_forward_length": cfg["moe_intermediate_size"],
        f"{ARCH}.expert_count": n_expert(cfg),
        f"{ARCH}.expert_used_count": cfg["num_experts_per_tok"],
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
    _check(cfg)
    d, vocab = cfg["hidden_size"], cfg["vocab_size"]
    e, ff = n_expert(cfg), cfg["moe_intermediate_size"]
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
                b + "attn_k.weight": (n_kv * hd, d),
                b + "attn_v.weight": (n_kv * hd, d),
                b + "attn_output.weight": (d, n_head * hd),
                b + "attn_q_norm.weight": (hd,),
                b + "attn_k_norm.weight": (hd,),
                b + "ffn_gate_inp.weight": (e, d),
                b + "ffn_gate_exps.weight": (e, ff, d),
                b + "ffn_up_exps.weight": (e, ff, d),
                b + "ffn_down_exps.weight": (e, d, ff),
            }
        )
        if cfg.get("attention_bias"):
            out.update(
                {
                    b + "attn_q.bias": (n_head * hd,),
                    b + "attn_k.bias": (n_kv * hd,),
                    b + "attn_v.bias": (n_kv * hd,),
                }
            )
    return out


def _dtype(refs: list[TensorRef]) -> str:
    """What a derived tensor reports: F32 (it loads through `load()`), or the first
    non-float dtype among its sources, so the driver refuses it by name."""
    return next((r.dtype for r in refs if r.dtype not in FLOAT_DTYPES), "F32")


def _stacked(name: str, parts: list[TensorRef]) -> TensorRef:
    """One (E, ...) tensor from the experts' matrices, loaded together when written."""
    if len({p.shape for p in parts}) != 1:
        raise ConvertError(
            f"{parts[0].file.name}: {name}: experts differ in shape "
            f"({sorted({p.shape for p in parts})})"
        )
    return TensorRef(
        parts[0].file,
        name,
        (len(parts), *parts[0].shape),
        _dtype(parts),
        lambda: np.stack([p.load() for p in parts]),
    )


def _half(fused: TensorRef, name: str, second: bool) -> TensorRef:
    """The gate (first) or up (second) half of a fused (E, 2F, D) gate_up_proj."""
    if len(fused.shape) != 3 or fused.shape[1] % 2:
        raise ConvertError(
            f"{fused.file.name}: tensor {fused.name} has shape {list(fused.shape)}; "
            "expected (experts, 2 * moe_intermediate_size, hidden_size)"
        )
    e, f, d = fused.shape[0], fused.shape[1] // 2, fused.shape[2]

    def load() -> np.ndarray:
        a = fused.load()
        return np.ascontiguousarray(a[:, f:] if second else a[:, :f])

    return TensorRef(fused.file, name, (e, f, d), _dtype([fused]), load)


def tensor_refs(cfg: dict[str, Any], refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """The checkpoint's tensors with each layer's experts as three stacked tensors,
    `model.layers.N.mlp.experts.{gate,up,down}_proj`, whichever layout they came in."""
    _check(cfg)  # before the expert count is trusted
    out: dict[str, TensorRef] = {}
    groups: dict[str, dict[int, TensorRef]] = {}

    def put(name: str, ref: TensorRef) -> None:
        if name in out:
            raise ConvertError(
                f"{ref.file.name}: tensor {ref.name}: the layer's experts are given twice "
                "(per expert and fused)"
            )
        out[name] = ref

    for name, ref in refs.items():
        if m := _PER_EXPERT.fullmatch(name):
            layer, e, kind = m.groups()
            groups.setdefault(f"model.layers.{layer}.mlp.experts.{kind}_proj", {})[int(e)] = ref
        elif m := _GATE_UP.fullmatch(name):
            stem = f"model.layers.{m.group(1)}.mlp.experts."
            put(stem + "gate_proj", _half(ref, stem + "gate_proj", second=False))
            put(stem + "up_proj", _half(ref, stem + "up_proj", second=True))
        elif m := _DOWN.fullmatch(name):  # fused down_proj: already (E, D, F)
            stem = f"model.layers.{m.group(1)}.mlp.experts."
            put(stem + "down_proj", dataclasses.replace(ref, name=stem + "down_proj"))
        else:
            out[name] = ref
    n = n_expert(cfg)
    for name, parts in groups.items():
        if sorted(parts) != list(range(n)):
            missing = sorted(set(range(n)) - set(parts))
            extra = sorted(set(parts) - set(range(n)))
            raise ConvertError(
                f"{name}: {n} experts in config.json, but the checkpoint "
                + (f"lacks experts {missing}" if missing else f"has extra experts {extra}")
            )
        put(name, _stacked(name, [parts[e] for e in range(n)]))
    return out


def gguf_name(cfg: dict[str, Any], hf_name: str) -> str | None:
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    for pattern, repl in _NAMES:
        if re.fullmatch(pattern, hf_name):
            name = re.sub(pattern, repl, hf_name)
            return None if name == "output.weight" and _tied(cfg) else name
    raise KeyError(f"{hf_name}: not a qwen3moe tensor")


def tensor(cfg: dict[str, Any], hf_name: str, array: np.ndarray) -> tuple[str, np.ndarray] | None:
    name = gguf_name(cfg, hf_name)
    return None if name is None else (name, array)
