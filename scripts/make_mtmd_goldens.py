"""Write tests/testdata/convert/gemma3_mtmd.json: llama.cpp's multimodal path (libmtmd) on
herd's text + projector files of the tiny Gemma 3 vision model, for the tests to compare
herd with when llama-cpp-python is not installed (it is not a test dependency).

The model is tests/convert/test_gemma3_vision.py's (random, seeded), converted with
`herd convert --mmproj` (F32); the image is scikit-image's astronaut at the model's image
size. Recorded: every tensor's sha256 of both files (the test checks it builds the same
model), the image's pixels, and what scripts/llama_cpp_mtmd.py reports: the prompt's
tokens, the image embeddings and the last token's logits.

Run with herd's venv (torch, transformers, scikit-image) and point --llama-python at an
interpreter with llama-cpp-python 0.3.36 (the `goldens` extra; herd's venv if it has it):

    .venv/bin/python scripts/make_mtmd_goldens.py [--llama-python /path/to/python]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "testdata" / "convert" / "gemma3_mtmd.json"
PROMPT = "Describe this photo\n\n<__media__>\n\nin detail"  # as the test builds it
DIGITS = 6


def tensor_sha256(*paths: Path) -> dict[str, str]:
    from herd.gguf import open_gguf

    out = {}
    for path in paths:
        g = open_gguf(path)
        out |= {
            f"{path.stem}:{n}": hashlib.sha256(g.raw(n).tobytes()).hexdigest() for n in g.tensors
        }
    return out


def photo(size: int) -> np.ndarray:
    """(size, size, 3) uint8: the astronaut, resized as the test resizes it."""
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((size, size)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-python", default=sys.executable)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from convert.test_gemma3_vision import IMAGE_SIZE, _build

    from herd.convert import convert

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        _build(tmp / "hf")
        text = convert(tmp / "hf", tmp / "text.gguf", "f32", mmproj=tmp / "proj.gguf")
        image = photo(IMAGE_SIZE)
        np.save(tmp / "image.npy", image)
        script = ROOT / "scripts" / "llama_cpp_mtmd.py"
        files = [str(text), str(tmp / "proj.gguf"), PROMPT, str(tmp / "image.npy")]
        subprocess.run([args.llama_python, str(script), *files, str(tmp / "out.npz")], check=True)
        ref = np.load(tmp / "out.npz")
        golden = {
            "prompt": PROMPT,
            "sha256": tensor_sha256(text, tmp / "proj.gguf"),
            "pixels": image.tolist(),
            "tokens": ref["tokens"].astype(int).tolist(),
            "image": np.round(ref["image"].astype(np.float64), DIGITS).tolist(),
            "logits": np.round(ref["logits"].astype(np.float64), DIGITS).tolist(),
        }
    OUT.write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
