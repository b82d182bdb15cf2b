"""Snapshot a model's logits on one backend, to show that a change leaves them bit-identical.

    python scripts/logits_snapshot.py smollm2:135m -o before.npz      # at one commit
    python scripts/logits_snapshot.py smollm2:135m --compare before.npz   # at another

Two paths are recorded: a teacher-forced prompt (`LLM.logits`, one batch) and the logits
row of every greedy decode step after it (the runner's cached path, with graph reuse),
taken from the rows the runner hands to its sampler. `--compare` prints whether every
array is bit-identical and, if not, the largest difference; it exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import herd
from herd.runner import engine

PROMPT = (
    "The history of the river valley begins with the first farmers, who learned to read "
    "the floods and to store grain against the lean years. Over centuries they built "
    "canals, markets and temples, and wrote down laws that their neighbours copied. "
)


def snapshot(model: str, backend: str, steps: int) -> dict[str, np.ndarray]:
    llm = herd.load(model, backend=backend)
    ids = llm.tokenize(PROMPT * 3, add_special=True)
    prompt = llm.logits(ids)
    rows: list[np.ndarray] = []
    advance = engine.Runner._advance

    def record(self, seq, logits):  # type: ignore[no-untyped-def]
        rows.append(np.array(logits, copy=True))
        return advance(self, seq, logits)

    engine.Runner._advance = record  # type: ignore[method-assign]
    try:
        opts = {"temperature": 0, "num_predict": steps, "seed": 1}
        out = llm.generate(PROMPT, options=opts)
    finally:
        engine.Runner._advance = advance  # type: ignore[method-assign]
    llm.close()
    tokens = np.array(out["context"], np.int64)  # type: ignore[index]
    return {"prompt": prompt, "decode": np.stack(rows), "tokens": tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--backend", default="ggml")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("-o", "--output")
    ap.add_argument("--compare")
    args = ap.parse_args()
    now = snapshot(args.model, args.backend, args.steps)
    if args.output:
        np.savez(args.output, **now)
    if not args.compare:
        return 0
    before = dict(np.load(args.compare))
    same = True
    for key, old in before.items():
        new = now[key]
        if old.shape != new.shape:
            print(f"{key}: shape {old.shape} -> {new.shape}")
            same = False
        elif not np.array_equal(old, new):
            diff = np.max(np.abs(old.astype(np.float64) - new.astype(np.float64)))
            print(f"{key}: differs, max |diff| {diff:.3g}")
            same = False
        else:
            print(f"{key}: bit-identical {old.shape}")
    print(f"{args.model} on {args.backend}: " + ("bit-identical" if same else "DIFFERENT"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
