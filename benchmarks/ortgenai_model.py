"""An onnxruntime-genai model made from the GGUF herd runs, so the two run the same weights.

    python -m benchmarks.ortgenai_model [MODEL]   # prints the model's folder

MODEL is what `benchmarks.compare --model` takes (a store name or a .gguf path). The steps,
each done by the peer's own code:

1. transformers reads the GGUF, dequantizing every block to float32 (and un-permuting Q/K
   to Hugging Face's layout); `save_pretrained` writes a plain Hugging Face checkpoint
   with the tokenizer read from the same file (as benchmarks/mlx_model.py does).
2. onnxruntime-genai's model builder makes its ONNX model from that folder:
   `python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu
   --extra_options block_size=32 accuracy_level=4 hf_token=false`: its own RTN quantizer,
   4 bits in blocks of 32 (MatMulNBits), activations quantized to int8 (level 4, its CPU
   default). So the weights are the GGUF's, re-quantized by the builder: the same shapes
   and compute as herd's Q4_1 blocks, not the same numbers.

The builder imports `onnx_ir`, which onnxruntime-genai 0.18's wheel does not require: it
must be importable (pip install onnx-ir), or the build fails with that message.

Cached under `$HERD_CACHE/bench/ortgenai/<key>/` (key: 12 hex digits of the GGUF's sha256
and the recipe), built in a temporary folder beside it and renamed into place whole.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.mlx_model import gguf_digest, prune_stale

RECIPE = "int4-b32-acc4-cpu"
BUILDER_ARGS = ["-p", "int4", "-e", "cpu", "--extra_options", "block_size=32",
                "accuracy_level=4", "hf_token=false"]  # fmt: skip


def cache_root() -> Path:
    from herd import envconfig

    return envconfig.cache_dir() / "bench" / "ortgenai"


def model_dir(gguf: str | Path, root: Path | None = None) -> Path:
    """Where the onnxruntime-genai model for this GGUF lives (made or not)."""
    return (root or cache_root()) / f"{gguf_digest(Path(gguf))[:12]}-{RECIPE}"


def _hf_checkpoint(gguf: Path, work: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = work / "gguf"  # transformers wants a folder and a name ending in .gguf
    src.mkdir()
    (src / "model.gguf").symlink_to(gguf.resolve())
    model = AutoModelForCausalLM.from_pretrained(
        str(src),
        gguf_file="model.gguf",
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    hf = work / "hf"
    model.save_pretrained(hf)
    AutoTokenizer.from_pretrained(str(src), gguf_file="model.gguf").save_pretrained(hf)
    return hf


def build_command(hf: Path, out: Path, cache: Path) -> list[str]:
    """The builder's command line (its own process: its imports stay out of ours)."""
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
            "-o", str(out), "-c", str(cache), *BUILDER_ARGS]  # fmt: skip


def ensure(gguf: str | Path, root: Path | None = None) -> Path:
    """The onnxruntime-genai model for this GGUF, made on first use and reused after."""
    gguf = Path(gguf)
    root = root or cache_root()
    final = model_dir(gguf, root)
    if (final / "genai_config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    prune_stale(root)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=root))
    try:
        hf = _hf_checkpoint(gguf, work)
        done = subprocess.run(
            build_command(hf, work / "out", work / "cache"),
            stdout=sys.stderr,  # the builder's progress: not in the table
            stderr=subprocess.PIPE,
            text=True,
        )
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["no message"]
            raise RuntimeError(f"onnxruntime-genai's builder failed: {tail[0]}")
        try:
            (work / "out").rename(final)  # atomic: the folder appears whole or not at all
        except OSError:
            if not (final / "genai_config.json").is_file():  # not a concurrent build that won
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2:135m")
    args = ap.parse_args()
    from benchmarks.compare import model_path

    print(ensure(model_path(args.model)))


if __name__ == "__main__":
    sys.exit(main())
