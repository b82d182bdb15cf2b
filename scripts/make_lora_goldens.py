"""Write tests/testdata/convert/lora.json: llama.cpp's logits with herd's converted adapters.

Builds the seeded tiny Llama and its two PEFT LoRA adapters of tests/convert/lora_case.py,
converts the base (f32) and each adapter (`herd.convert.lora.convert_lora`, f32) with herd,
records every tensor's sha256, then lets llama.cpp (llama-cpp-python) load herd's files
and records its logits: the base alone, adapter "one" at scale 1, and both adapters at
their own scales (`llama_set_adapters_lora`). tests/convert/test_lora.py converts again,
checks the hashes (the very same files) and compares herd's logits with these.

Run with herd's venv (torch, transformers, peft); --llama-python names an interpreter with
`llama-cpp-python` (the `goldens` extra; default: this one), which runs this same file in
--llama mode, importing only llama_cpp and numpy:

    .venv/bin/python scripts/make_lora_goldens.py [--llama-python /path/to/python]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "testdata" / "convert" / "lora.json"
N_THREADS = 2
LOGIT_POSITIONS = 8  # the last rows only, to keep the file small
DIGITS = 5


def run_llama(jobs_path: Path, out_path: Path) -> None:
    """llama.cpp side: logits of `ids` for each job's adapters and scales."""
    import llama_cpp

    results = []
    for job in json.loads(jobs_path.read_text()):
        llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=64, n_batch=64, logits_all=True,
                              n_threads=N_THREADS, verbose=False)  # fmt: skip
        adapters = [llama_cpp.llama_adapter_lora_init(llm._model.model, p.encode())
                    for p, _ in job["adapters"]]  # fmt: skip
        if not all(adapters):
            raise SystemExit(f"llama.cpp refused an adapter of {job['adapters']}")
        if adapters:
            n = len(adapters)
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*adapters)
            scales = (ctypes.c_float * n)(*[s for _, s in job["adapters"]])
            if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, arr, n, scales):
                raise SystemExit("llama_set_adapters_lora failed")
        llm.eval(job["ids"])
        results.append(np.asarray(llm.scores[: len(job["ids"])]).tolist())
        del llm
    out_path.write_text(json.dumps({"version": llama_cpp.__version__, "results": results}))


def tensor_sha256(path: Path) -> dict[str, str]:
    from herd.gguf import open_gguf

    g = open_gguf(path)
    return {name: hashlib.sha256(g.raw(name).tobytes()).hexdigest() for name in g.tensors}


def goldens(python: str, tmp: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from convert import lora_case as lc

    from herd.convert import convert
    from herd.convert.lora import convert_lora

    src, model = lc.base(tmp / "base")
    base = convert(src, tmp / "base.gguf", "f32")
    files = {n: convert_lora(lc.adapter(model, n, tmp / n), tmp / f"{n}.gguf", src)
             for n in lc.ADAPTERS}  # fmt: skip
    ids = [int(i) for i in lc.ids(model.config.vocab_size)]
    cases = {"base": {}, "one": {"one": 1.0}, "both": dict(lc.SCALES)}
    jobs = [{"gguf": str(base), "ids": ids,
             "adapters": [[str(files[n]), s] for n, s in scales.items()]}
            for scales in cases.values()]  # fmt: skip
    jobs_path, out_path = tmp / "jobs.json", tmp / "results.json"
    jobs_path.write_text(json.dumps(jobs))
    subprocess.run([python, __file__, "--llama", str(jobs_path), str(out_path)], check=True)
    data = json.loads(out_path.read_text())
    rows = slice(len(ids) - LOGIT_POSITIONS, len(ids))
    return {
        "base_case": lc.BASE,
        "adapters": {n: {"seed": s, "rank": r, "alpha": a} for n, (s, r, a) in lc.ADAPTERS.items()},
        "llama_cpp_python": data["version"],
        "tensors": {"base": tensor_sha256(base), **{n: tensor_sha256(p) for n, p in files.items()}},
        "ids": ids,
        "positions": list(range(rows.start, rows.stop)),
        "cases": {
            name: {"scales": scales, "logits": np.round(np.asarray(out)[rows], DIGITS).tolist()}
            for (name, scales), out in zip(cases.items(), data["results"], strict=True)
        },  # fmt: skip
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-python", default=sys.executable)
    p.add_argument("--llama", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.llama:
        run_llama(*args.llama)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = goldens(args.llama_python, Path(tmp))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
