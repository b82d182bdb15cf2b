"""A tiny random Llama with PEFT LoRA adapters, built from seeds, for the LoRA tests and
goldens (scripts/make_lora_goldens.py).

The base is tests/convert/tiny.py's `llama-gqa-tied` case (weights and tokenizer from
NumPy's PCG64, the same on every machine). Each adapter targets q, k, v, o and the MLP
with rank != alpha, and both its A and B are filled from NumPy's generator: PEFT starts B
at zero, which would make any adapter code look right.

Needs torch, transformers, peft (the `test` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .tiny import build, input_ids

BASE = "llama-gqa-tied"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (seed, rank, alpha): scales alpha / rank of 2.0 and 0.75
ADAPTERS = {"one": (11, 8, 16.0), "two": (12, 4, 3.0)}
SCALES = {"one": 0.7, "two": -0.5}  # the two-adapter case: each its own user scale


def base(dest: Path) -> tuple[Path, Any]:
    """The base model's Hugging Face directory and the transformers model."""
    return build(BASE, dest)


def adapter(model: Any, name: str, dest: Path) -> Path:
    """Adapter `name` for `model` (left unchanged), saved by PEFT to `dest`."""
    import copy

    import peft
    import torch

    seed, rank, alpha = ADAPTERS[name]
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0)
    wrapped = peft.get_peft_model(copy.deepcopy(model), cfg)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for pname, p in sorted(wrapped.named_parameters()):
            if ".lora_A." in pname or ".lora_B." in pname:
                v = rng.standard_normal(tuple(p.shape)).astype(np.float32)
                p.copy_(torch.from_numpy(v / np.sqrt(p.shape[1]).astype(np.float32) * 0.5))
    wrapped.save_pretrained(dest)
    return dest


def copy_of(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


def peft_model(model: Any, adapters: dict[str, Path], scales: dict[str, float]) -> Any:
    """`model` with the saved adapters loaded by PEFT and all active, each at its scale
    (PEFT's `set_scale`: scale * alpha / rank)."""
    import copy

    import peft

    names = list(adapters)
    out = peft.PeftModel.from_pretrained(copy.deepcopy(model), adapters[names[0]], names[0])
    for n in names[1:]:
        out.load_adapter(adapters[n], adapter_name=n)
    out.base_model.set_adapter(names)
    for m in out.modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            for n in names:
                m.set_scale(n, scales.get(n, 1.0))
    return out.eval()


def ids(n_vocab: int) -> list[int]:
    return input_ids(BASE, n_vocab)
