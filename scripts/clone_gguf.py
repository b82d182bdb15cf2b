"""A GGUF with another model's metadata, tensor names, shapes and types, but random weights.

    python scripts/clone_gguf.py export MODEL.gguf META.json   # metadata + tensor list only
    python scripts/clone_gguf.py build META.json OUT.gguf      # random weights, same layout

For speed measurements where the real file cannot travel (a GPU machine reached through a
64 MiB transfer limit): every matmul sees the same types and shapes as the real model, so
the timings are the model's; the logits are noise.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from gguf import GGMLQuantizationType

sys.path.insert(0, "src")
from herd.gguf import open_gguf  # noqa: E402
from herd.gguf.quants import quantize  # noqa: E402
from herd.gguf.writer import write_gguf  # noqa: E402


def export(model: str, meta: str) -> None:
    g = open_gguf(model)
    tensors = [[t.name, list(t.shape), t.type.name] for t in g.tensors.values()]
    json.dump({"kv": g.kv, "tensors": tensors}, open(meta, "w"))


def build(meta: str, out: str) -> None:
    data = json.load(open(meta))
    rng = np.random.default_rng(0)

    def tensors():
        for name, shape, kind in data["tensors"]:
            qtype = GGMLQuantizationType[kind]
            w = rng.standard_normal(shape, dtype=np.float32) * 0.02
            if name.endswith("norm.weight"):
                w += 1.0
            yield name, quantize(w, qtype), qtype

    kv = data["kv"]
    write_gguf(out, kv["general.architecture"], kv, tensors())


if __name__ == "__main__":
    {"export": export, "build": build}[sys.argv[1]](*sys.argv[2:])
