"""A GGUF with every 2-D weight re-quantized to one block type, for benchmarks that need the
same weight format on both sides (benchmarks/onnx.py: onnxruntime-genai's builder makes
symmetric int4 everywhere, output head included; `--model` this script's Q4_0 file gives
herd the same format).

    python -m benchmarks.requantize SRC.gguf DST.gguf [--type q4_0]

Lossy by design (a Q4_1 weight is dequantized, then quantized again): for speed, never
for correctness figures. `herd create -q` refuses quantized sources, as Ollama does.
Metadata and 1-D tensors (norms) are copied as they are; the file type says the new type.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize

from herd.gguf.quants import quantize

TYPES = {"q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0), "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0)}


def requantize(src: Path, dst: Path, qtype: str = "q4_0") -> Path:
    to, file_type = TYPES[qtype]
    r = GGUFReader(src)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")  # renamed into place when whole
    try:
        _write(r, tmp, to, file_type)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(dst)
    return dst


def _write(r: GGUFReader, tmp: Path, to: Q, file_type: LlamaFileType) -> None:
    w = GGUFWriter(tmp, str(r.fields["general.architecture"].contents()))
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), vtype, sub_type=sub)
    w.add_file_type(int(file_type))
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # NumPy order
        if len(shape) == 2 and t.tensor_type != to:
            dense = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
            raw = quantize(dense, to)
            w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=to)
        else:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--type", default="q4_0", choices=sorted(TYPES))
    args = ap.parse_args()
    if not args.src.is_file():
        ap.error(f"{args.src}: no such file")
    try:
        print(requantize(args.src, args.dst, args.type))
    except (ValueError, OSError) as e:  # not a GGUF, a type gguf cannot dequantize, disk
        ap.error(f"{args.src}: {e}")


if __name__ == "__main__":
    main()
