"""Write tests/testdata/convert/rerank.json: llama.cpp's rerank scores on herd's file.

Builds the tiny cross-encoder of tests/convert/rerank_case.py, converts it with herd (f32),
records each tensor's sha256, then lets llama.cpp (llama-cpp-python, pooling type rank)
load herd's file and score the query-document pairs, given as herd's token ids. The test
(tests/convert/test_rerank.py) checks that herd's file is byte for byte the one llama.cpp
read and that herd scores it as llama.cpp does, so the classifier head is written under
llama.cpp's names and meanings (`cls`: pooler dense + tanh, `cls.output`: classifier).

llama.cpp feeds every token type 0 (its rerank pairs carry no segments), so the pairs
are scored here and compared in the test with all types 0; herd's own rerank gives the
document part type 1, as Hugging Face and sentence-transformers do.

Run with herd's venv; --llama-python is an interpreter with `llama-cpp-python` (the
`goldens` extra), which runs this same file in --llama mode (llama_cpp and numpy only):

    .venv/bin/python scripts/make_rerank_goldens.py --llama-python .venv/bin/python
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "testdata" / "convert" / "rerank.json"
N_THREADS = 2
DIGITS = 6


def run_llama(jobs_path: Path, out_path: Path) -> None:
    """llama.cpp's score of each token list, one sequence per decode."""
    import llama_cpp

    job = json.loads(jobs_path.read_text())
    llm = llama_cpp.Llama(
        model_path=job["gguf"],
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_RANK,
        n_ctx=job["n_ctx"],
        n_batch=job["n_ctx"],
        n_ubatch=job["n_ctx"],
        n_threads=N_THREADS,
        verbose=False,
    )
    scores = []
    for ids in job["pairs"]:
        llm._batch.reset()
        llm._batch.add_sequence(ids, 0, True)
        llm._ctx.kv_cache_clear()
        llm._ctx.decode(llm._batch)
        scores.append(float(llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, 0)[0]))
    out_path.write_text(json.dumps({"version": llama_cpp.__version__, "scores": scores}))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--llama":
        run_llama(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-python", default=sys.executable, help="a Python with llama_cpp")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from convert.rerank_case import CTX, DOCS, QUERY, build_cross_encoder

    import herd
    from herd.convert import convert
    from herd.gguf import open_gguf
    from herd.runner.rerank import prepare_rerank

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "hf"
        build_cross_encoder(src)
        path = convert(src, Path(tmp) / "rerank.gguf", "f32")
        g = open_gguf(path)
        tensors = {n: hashlib.sha256(g.raw(n).tobytes()).hexdigest() for n in g.tensors}
        llm = herd.load(path, backend="numpy")
        pairs, _ = prepare_rerank(llm.loaded, QUERY, DOCS)
        llm.close()
        jobs, out = Path(tmp) / "jobs.json", Path(tmp) / "out.json"
        job: dict[str, Any] = {"gguf": str(path), "n_ctx": CTX, "pairs": [p[0] for p in pairs]}
        jobs.write_text(json.dumps(job))
        subprocess.run([args.llama_python, __file__, "--llama", str(jobs), str(out)], check=True)
        result = json.loads(out.read_text())
    golden = {
        "llama_cpp_python": result["version"],
        "tensors": {"f32": tensors},
        "pairs": job["pairs"],
        "scores": [round(s, DIGITS) for s in result["scores"]],
    }
    OUT.write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
