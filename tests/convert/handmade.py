"""A tiny BERT Hugging Face directory written by hand (NumPy, JSON, a vocab.txt).

No torch or transformers needed: for driver, bad-input and pull tests.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

CFG = {
    "architectures": ["BertModel"],
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "vocab_size": 12,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
}
VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "hello",
    "world",
    "##s",
    "h",
    "w",
    "##o",
    ",",
]


def bert_tensors(cfg: dict = CFG, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, ff = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {
        "embeddings.word_embeddings.weight": (cfg["vocab_size"], d),
        "embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], d),
        "embeddings.token_type_embeddings.weight": (cfg["type_vocab_size"], d),
        "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
        "embeddings.position_ids": (1, cfg["max_position_embeddings"]),  # dropped
        "pooler.dense.weight": (d, d),  # dropped
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for sub, shape in (
            ("attention.self.query", (d, d)),
            ("attention.self.key", (d, d)),
            ("attention.self.value", (d, d)),
            ("attention.output.dense", (d, d)),
            ("intermediate.dense", (ff, d)),
            ("output.dense", (d, ff)),
        ):
            shapes[p + sub + ".weight"] = shape
            shapes[p + sub + ".bias"] = shape[:1]
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + norm + ".weight"] = (d,)
            shapes[p + norm + ".bias"] = (d,)
    out = {}
    for name, shape in shapes.items():
        if name == "embeddings.position_ids":
            out[name] = np.arange(shape[1], dtype=np.int64).reshape(shape)
        else:
            out[name] = rng.standard_normal(shape).astype(np.float32)
    return out


_ST = {
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int8"): "I8",
}


def write_safetensors(
    path: Path, tensors: dict[str, np.ndarray], dtypes: dict[str, str] | None = None
) -> Path:
    """The safetensors format by hand; `dtypes` overrides the recorded dtype (e.g. BF16)."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        data = np.ascontiguousarray(a).tobytes()
        dtype = (dtypes or {}).get(name) or _ST[a.dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    return path


def make_dir(
    root: Path,
    tensors: dict[str, np.ndarray] | None = None,
    cfg: dict | None = None,
    dtypes: dict[str, str] | None = None,
) -> Path:
    src = root / "hf"
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps(cfg or CFG))
    (src / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    write_safetensors(
        src / "model.safetensors", bert_tensors() if tensors is None else tensors, dtypes
    )
    return src
