"""Hugging Face BERT encoders (BertModel, sentence-transformers directories) and
cross-encoders (BertForSequenceClassification, sentence-transformers' CrossEncoder) -> GGUF.

Names follow llama.cpp's bert architecture. An encoder's pooler and the masked-LM /
next-sentence heads are dropped (only embeddings are served). A cross-encoder keeps its
head under llama.cpp's names: the pooler (dense, tanh in the model) as `cls`, the
classifier as `cls.output`, with `bert.pooling_type` 4 (rank) and the label names in
`bert.classifier.output_labels`, so llama.cpp loads the file as a reranker too (its own
converter drops the pooler, which changes the scores). One label only: a classifier with
more is not a reranker. A sentence-transformers directory names its
pooling in `modules.json` -> `<Pooling path>/config.json`; that becomes `bert.pooling_type`
(1 mean, 2 CLS, 3 last token), as llama.cpp's converter writes it.
The driver contract (names, shapes, hooks) is described in `herd/convert/driver.py`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from herd.errors import UnsupportedModelError

ARCH = "bert"
HF_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification")

POOLING_MEAN, POOLING_CLS, POOLING_LAST, POOLING_RANK = 1, 2, 3, 4

_L = r"encoder\.layer\.(\d+)\."
_NAMES = [
    (r"embeddings\.word_embeddings\.weight", "token_embd.weight"),
    (r"embeddings\.token_type_embeddings\.weight", "token_types.weight"),
    (r"embeddings\.position_embeddings\.weight", "position_embd.weight"),
    (r"embeddings\.LayerNorm\.(weight|bias)", r"token_embd_norm.\1"),
    (_L + r"attention\.self\.query\.(weight|bias)", r"blk.\1.attn_q.\2"),
    (_L + r"attention\.self\.key\.(weight|bias)", r"blk.\1.attn_k.\2"),
    (_L + r"attention\.self\.value\.(weight|bias)", r"blk.\1.attn_v.\2"),
    (_L + r"attention\.output\.dense\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (_L + r"attention\.output\.LayerNorm\.(weight|bias)", r"blk.\1.attn_output_norm.\2"),
    (_L + r"intermediate\.dense\.(weight|bias)", r"blk.\1.ffn_up.\2"),
    (_L + r"output\.dense\.(weight|bias)", r"blk.\1.ffn_down.\2"),
    (_L + r"output\.LayerNorm\.(weight|bias)", r"blk.\1.layer_output_norm.\2"),
]
_DROPPED = ("embeddings.position_ids", "pooler.", "cls.predictions.", "cls.seq_relationship.")
_HEAD = {
    "pooler.dense.weight": "cls.weight",
    "pooler.dense.bias": "cls.bias",
    "classifier.weight": "cls.output.weight",
    "classifier.bias": "cls.output.bias",
}


def is_rank(cfg: dict[str, Any]) -> bool:
    """A cross-encoder: a sequence-classification head (checked to have one label)."""
    return (cfg.get("architectures") or [""])[0] == "BertForSequenceClassification"


def labels(cfg: dict[str, Any]) -> list[str]:
    """The classifier's label names by index; UnsupportedModelError unless exactly one."""
    id2label = cfg.get("id2label") or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)] or ["LABEL_0"]
    if len(names) != 1 or int(cfg.get("num_labels", 1)) != 1:
        raise UnsupportedModelError(
            f"bert: a sequence classifier with {max(len(names), int(cfg.get('num_labels', 1)))}"
            " labels is not a reranker (a cross-encoder has one label, its relevance logit)"
        )
    return names


def kv(cfg: dict[str, Any]) -> dict[str, Any]:
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise UnsupportedModelError(f"bert: hidden_act {act!r} is not supported (only gelu)")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError("bert: only absolute position embeddings are supported")
    head: dict[str, Any] = {}
    if is_rank(cfg):
        head = {
            f"{ARCH}.pooling_type": POOLING_RANK,
            f"{ARCH}.classifier.output_labels": labels(cfg),
        }
    return {
        **head,
        "general.architecture": ARCH,
        f"{ARCH}.block_count": cfg["num_hidden_layers"],
        f"{ARCH}.context_length": cfg.get("max_position_embeddings", 512),
        f"{ARCH}.embedding_length": cfg["hidden_size"],
        f"{ARCH}.feed_forward_length": cfg["intermediate_size"],
        f"{ARCH}.attention.head_count": cfg["num_attention_heads"],
        f"{ARCH}.attention.layer_norm_epsilon": float(cfg.get("layer_norm_eps", 1e-12)),
        f"{ARCH}.attention.causal": False,
    }


def dir_kv(cfg: dict[str, Any], src: Path) -> dict[str, Any]:
    """`bert.pooling_type` from a sentence-transformers directory's Pooling module (a
    cross-encoder's is rank, whatever the directory says)."""
    modules = src / "modules.json"
    if is_rank(cfg) or not modules.is_file():
        return {}
    pooling = next(
        (
            m["path"]
            for m in json.loads(modules.read_text(encoding="utf-8"))
            if m.get("type") == "sentence_transformers.models.Pooling"
        ),
        None,
    )
    if pooling is None:
        return {}
    conf = json.loads((src / pooling / "config.json").read_text(encoding="utf-8"))
    if conf.get("pooling_mode_mean_tokens"):
        kind = POOLING_MEAN
    elif conf.get("pooling_mode_cls_token"):
        kind = POOLING_CLS
    elif conf.get("pooling_mode_lasttoken"):
        kind = POOLING_LAST
    else:
        raise UnsupportedModelError(
            f"{pooling}/config.json: only mean, CLS and last-token pooling are supported"
        )
    return {f"{ARCH}.pooling_type": kind}


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, ff = cfg["hidden_size"], cfg["intermediate_size"]
    out: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (cfg["vocab_size"], d),
        "token_types.weight": (cfg.get("type_vocab_size", 2), d),
        "position_embd.weight": (cfg.get("max_position_embeddings", 512), d),
        "token_embd_norm.weight": (d,),
        "token_embd_norm.bias": (d,),
    }
    for i in range(cfg["num_hidden_layers"]):
        b = f"blk.{i}."
        for name, shape in (
            ("attn_q", (d, d)),
            ("attn_k", (d, d)),
            ("attn_v", (d, d)),
            ("attn_output", (d, d)),
            ("ffn_up", (ff, d)),
            ("ffn_down", (d, ff)),
        ):
            out[b + name + ".weight"] = shape
            out[b + name + ".bias"] = shape[:1]
        for norm in ("attn_output_norm", "layer_output_norm"):
            out[b + norm + ".weight"] = (d,)
            out[b + norm + ".bias"] = (d,)
    if is_rank(cfg):
        n = len(labels(cfg))  # refuses more than one, before a byte is written
        out.update({"cls.weight": (d, d), "cls.bias": (d,)})
        out.update({"cls.output.weight": (n, d), "cls.output.bias": (n,)})
    return out


def gguf_name(cfg: dict[str, Any], hf_name: str) -> str | None:
    name = hf_name.removeprefix("bert.")
    if name.endswith(".gamma"):  # very old checkpoints
        name = name[: -len(".gamma")] + ".weight"
    elif name.endswith(".beta"):
        name = name[: -len(".beta")] + ".bias"
    if is_rank(cfg) and name in _HEAD:
        return _HEAD[name]
    if name.startswith(_DROPPED):
        return None
    for pattern, repl in _NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    raise KeyError(f"{hf_name}: not a bert tensor")


def tensor(cfg: dict[str, Any], hf_name: str, array: np.ndarray) -> tuple[str, np.ndarray] | None:
    name = gguf_name(cfg, hf_name)
    return None if name is None else (name, array)
