"""An mlx-lm model made from the GGUF herd runs, so the two run the same weights.

    python -m benchmarks.mlx_model [MODEL] [--dtype float32]   # prints the model's folder

MODEL is what `benchmarks.compare --model` takes: a store name (`smollm2:135m`,
`gemma3:270m`) or a .gguf path. The steps, each done by the peer's own code:

1. transformers reads the GGUF (`from_pretrained(dir, gguf_file=..., quantization_config=
   GgufConfig(dequantize=True))`): every block is dequantized to float32 and Q/K are
   un-permuted to Hugging Face's layout. Its tokenizer is read from the same file.
2. `save_pretrained` writes that as a plain Hugging Face checkpoint (safetensors), its
   config.json given the rope fields mlx-lm reads (`legacy_rope_fields`): transformers 5
   writes `rope_parameters`, which mlx-lm 0.32 ignores, so SmolLM2 would otherwise get
   mlx-lm's default rope_theta (10000 in place of 100000): another model.
3. `mlx_lm.convert(quantize=True, q_bits=4, q_group_size=32, dtype=...)` loads it into
   mlx-lm's model class and quantizes every Linear and the embedding with MLX's affine
   quantizer: 4 bits in groups of 32 along a row, the shape of Q4_0/Q4_1's blocks.

So the weights are the GGUF's, but the mlx-lm model is *re-quantized* by mlx-lm: its
scales and biases are MLX's quantizer's, from each group's range, not the GGUF's d and m,
so its blocks are not bit-identical to the file's (herd's MLX backend keeps Q4_0/Q4_1/
Q8_0... as the file has them). Checked by hand: without step 3's quantization, mlx-lm's
greedy tokens equal herd-numpy's (12 of 12 on SmolLM2 and on Gemma 3); the 4-bit model's
part after 1 to 3 tokens: the same compute, not the same numbers.

Where the GGUF holds more than 4 bits (SmolLM2's Q8_0 embedding, Gemma 3's Q5_0/Q8_0/
Q6_K), mlx-lm's model is smaller than the file and herd's: the figure to quote is the one
on a model that is 4-bit throughout (SmolLM2 135M is Q4_1 bar its embedding). `dtype` is
what mlx-lm keeps the scales, biases, norms and activations in; float32 by
default, as herd's MLX backend holds scales in float32 (for exactness).

The result is cached under `$HERD_CACHE/bench/mlx/<key>/` (HERD_CACHE defaults to
~/.cache/herd), `<key>` being the GGUF's sha256 (a store blob's name, else the file's hash)
and the recipe. It is built in a temporary folder beside it and renamed into place whole,
so an interrupted run leaves no half-made model; leftovers of killed runs are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

BITS, GROUP_SIZE = 4, 32
DTYPES = ("float32", "float16", "bfloat16")
_TMP = re.compile(r"^\.tmp-(\d+)-")
_BLOB = re.compile(r"^sha256-([0-9a-f]{64})$")


def cache_root() -> Path:
    from herd import envconfig

    return envconfig.cache_dir() / "bench" / "mlx"


def gguf_digest(path: Path) -> str:
    """The file's sha256: a store blob is named by it, any other file is hashed."""
    if m := _BLOB.match(path.name):
        return m.group(1)
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def cache_key(digest: str, dtype: str) -> str:
    """The folder name: the GGUF (12 hex digits of its sha256 are plenty for a cache) and
    the recipe, so another bit width or dtype never reuses this one."""
    return f"{digest[:12]}-q{BITS}g{GROUP_SIZE}-{dtype}"


def model_dir(gguf: str | Path, dtype: str = "float32", root: Path | None = None) -> Path:
    """Where the mlx-lm model for this GGUF lives (made or not)."""
    return (root or cache_root()) / cache_key(gguf_digest(Path(gguf)), dtype)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def prune_stale(root: Path) -> list[Path]:
    """Remove the temporary folders of builds whose process is gone (killed mid-build)."""
    removed = []
    for entry in root.glob(".tmp-*") if root.is_dir() else []:
        m = _TMP.match(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def legacy_rope_fields(config: dict[str, Any]) -> dict[str, Any]:
    """config.json with transformers 5's `rope_parameters` also spelled as the fields
    mlx-lm's model classes read: `rope_theta` and `rope_scaling`; for per-layer-type
    parameters (Gemma 3), the full-attention layers' and `rope_local_base_freq`, the
    sliding ones' theta, and `sliding_window_pattern`. Fields already there are kept."""
    out = dict(config)
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return out
    if "full_attention" in rope or "sliding_attention" in rope:
        full, local = rope.get("full_attention", {}), rope.get("sliding_attention", {})
        if "rope_theta" in local:
            out.setdefault("rope_local_base_freq", local["rope_theta"])
        rope = full
    if "rope_theta" in rope:
        out.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        out.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    types = config.get("layer_types")
    if str(config.get("model_type", "")).startswith("gemma3") and types:
        # mlx-lm's Gemma 3: layer i is global iff (i + 1) % pattern == 0; check that holds
        full = "full_attention"
        pattern = types.index(full) + 1 if full in types else len(types) + 1
        if any((t == full) != ((i + 1) % pattern == 0) for i, t in enumerate(types)):
            raise ValueError(f"layer types {types} are not a pattern mlx-lm can express")
        out.setdefault("sliding_window_pattern", pattern)
    return out


def _convert(gguf: Path, work: Path, out: Path, dtype: str) -> None:
    import torch
    from mlx_lm import convert
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # transformers wants a folder and a file name ending in .gguf; a store blob has neither
    src = work / "gguf"
    src.mkdir()
    (src / "model.gguf").symlink_to(gguf.resolve())
    model = AutoModelForCausalLM.from_pretrained(
        str(src),
        gguf_file="model.gguf",
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file="model.gguf")
    hf = work / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    config = hf / "config.json"
    config.write_text(json.dumps(legacy_rope_fields(json.loads(config.read_text())), indent=2))
    del model
    convert(
        hf_path=str(hf),
        mlx_path=str(out),
        quantize=True,
        q_bits=BITS,
        q_group_size=GROUP_SIZE,
        dtype=dtype,
    )


def ensure(gguf: str | Path, dtype: str = "float32", root: Path | None = None) -> Path:
    """The mlx-lm model for this GGUF, made on first use and reused after."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    gguf = Path(gguf)
    root = root or cache_root()
    final = model_dir(gguf, dtype, root)
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    prune_stale(root)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=root))
    try:
        _convert(gguf, work, work / "mlx", dtype)
        try:
            (work / "mlx").rename(final)  # atomic: the folder appears whole or not at all
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent build that won
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2:135m")
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    args = ap.parse_args()
    from benchmarks.compare import model_path

    with contextlib.redirect_stdout(sys.stderr):  # mlx_lm.convert's progress
        folder = ensure(model_path(args.model), args.dtype)
    print(folder)


if __name__ == "__main__":
    sys.exit(main())
