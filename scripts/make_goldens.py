"""Write llama.cpp goldens for herd's tests (tokenizer ids, teacher-forced logits, greedy runs).

Run with a Python that has `llama-cpp-python` (the `goldens` extra), never herd itself:

    python scripts/make_goldens.py --smollm2 PATH --gemma3 PATH --out tests/testdata

Everything written is deterministic for a given llama-cpp-python build, model file and CPU
kernels; all three are recorded in each JSON (version, model sha256, kernels) so a stale
golden is easy to spot. The logits and greedy goldens are written per kernel set
(`logits_<model>.<kernels>.json`): ggml picks its CPU kernels by the vector extensions it
was built for (AVX-512, AVX2, NEON), and their float sums differ in the last digits
(SmolLM2's mean |Δ log p| 0.03 between AVX-512 and AVX2 llama.cpp), so each set needs its
own. The tokenizer goldens hold for every machine.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

N_THREADS = 2
SEED = 1234
LOGP_DIGITS = 5  # rounding keeps the files small; tests compare with a tolerance anyway

# Strings chosen to exercise every branch of the pre-tokenizers and the special-token split.
CORPUS: list[str] = [
    "",
    " ",
    "  ",
    "\n",
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "trailing space ",
    "   three leading spaces and two trailing  ",
    "multiple     spaces   between    words",
    "line one\nline two\n\nline four\n\n\n",
    "\r\nwindows\r\nline endings\r\n",
    "tabs\tin\t\ttext\t",
    "def add(a, b):\n\treturn a + b\n\nif __name__ == '__main__':\n    print(add(1, 2))\n",
    "for (int i = 0; i < n; ++i) { sum += x[i] * 2; }",
    "Café, naïve façade, résumé, Ångström, Straße, œuvre",
    "Ελληνικά κείμενο και Русский текст",
    "中文文本测试，我们今天去公园。",
    "日本語のテキスト、カタカナとひらがな。",
    "한국어 텍스트입니다.",
    "مرحبا بالعالم، هذا نص عربي.",
    "नमस्ते दुनिया, यह हिंदी पाठ है।",
    "ภาษาไทยไม่มีช่องว่าง",
    "emoji: 😀😃😄 👍🏽 ❤️ 🎉",
    "family ZWJ: 👨‍👩‍👧‍👦 and flag 🇫🇷 and 🏳️‍🌈",
    "digits 0 1 12 123 1234 12345 123456789 3.14159 -42 1,000,000",
    "phone +1-555-0100, year 2024, version v1.2.3",
    "I'm sure you're right, they've said it's theirs and we'll see what I'd do.",
    "I'M SURE YOU'RE RIGHT, THEY'VE SAID IT'S THEIRS, WE'LL SEE, I'D DO.",
    "don't can't won't isn't 'quoted' \"double\" `back`",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after<|endoftext|>",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "<bos>",
    "<bos>Hello<eos>",
    "text <unused0> with <pad> tokens <mask>",
    "<table><tr><td>cell</td></tr></table> <h1>Title</h1>",
    "weird <|im_start <im_end|> <|unknown|> < bos >",
    "URL https://example.com/path?q=1&x=y#frag and email a.b@c.org",
    "math: ∑_{i=1}^{n} x_i² ≤ ∞, α β γ δ → ∀x ∃y",
    "symbols ~!@#$%^&*()_+-=[]{}|;':\",./<>? §±",
    "a\u00a0non-breaking\u2003em space\u3000ideographic",
    "zero\u200bwidth\u200cjoiners\u200d",
    "CamelCaseIdentifiers and snake_case_names and SCREAMING_CASE",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!!!!!!??????........,,,,,,",
    "\n\n\n\n\n\n\n\n",
    "        indented with eight spaces",
    (
        "The history of natural language processing generally started in the 1950s, although "
        "work can be found from earlier periods. In 1950, Alan Turing published an article "
        'titled "Computing Machinery and Intelligence" which proposed what is now called the '
        "Turing test as a criterion of intelligence. The Georgetown experiment in 1954 involved "
        "fully automatic translation of more than sixty Russian sentences into English. The "
        "authors claimed that within three or five years, machine translation would be a solved "
        "problem. However, real progress was much slower, and after the ALPAC report in 1966, "
        "which found that ten years of research had failed to fulfill the expectations, funding "
        "for machine translation was dramatically reduced. Little further research in machine "
        "translation was conducted until the late 1980s when the first statistical machine "
        "translation systems were developed."
    ),
]

CHAT = {
    "smollm2": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "gemma3": (
        "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    ),
}

PARAGRAPH = (
    "Photosynthesis is the process by which green plants, algae and some bacteria convert "
    "light energy into chemical energy. During this process, carbon dioxide and water are "
    "combined, using the energy of sunlight, to produce glucose and oxygen. The reactions take "
    "place in the chloroplasts, which contain the pigment chlorophyll. Chlorophyll absorbs "
    "mostly blue and red light and reflects green light, which is why leaves look green. The "
    "light-dependent reactions capture energy in the form of ATP and NADPH, while the Calvin "
    "cycle uses that energy to fix carbon into sugars. Almost all life on Earth depends, "
    "directly or indirectly, on photosynthesis for food and for the oxygen in the atmosphere."
)

CODE = (
    "def quicksort(items):\n"
    '    """Sort a list with the quicksort algorithm."""\n'
    "    if len(items) <= 1:\n"
    "        return items\n"
    "    pivot = items[len(items) // 2]\n"
    "    left = [x for x in items if x < pivot]\n"
    "    middle = [x for x in items if x == pivot]\n"
    "    right = [x for x in items if x > pivot]\n"
    "    return quicksort(left) + middle + quicksort(right)\n"
)

MULTILINGUAL = "Bonjour le monde. Hallo Welt! 你好，世界。こんにちは。Привет, мир!"

GREEDY_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def long_text(min_tokens: int, llm: llama_cpp.Llama) -> str:
    """A text over `min_tokens` tokens, built from distinct sentences (not a repeated block)."""
    topics = [
        "rivers",
        "mountains",
        "cities",
        "forests",
        "deserts",
        "oceans",
        "islands",
        "valleys",
        "glaciers",
        "volcanoes",
        "lakes",
        "caves",
        "plains",
        "reefs",
    ]
    parts: list[str] = []
    i = 0
    while True:
        t = topics[i % len(topics)]
        parts.append(
            f"Chapter {i + 1}. The {t} of the northern region were studied by a team of "
            f"{3 + i} researchers over {2 + i % 5} seasons; they recorded the climate, the "
            f"animals that lived near the {t}, and how people had used them for centuries."
        )
        i += 1
        text = " ".join(parts)
        if len(tokenize(llm, text, True, False)) >= min_tokens:
            return text


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenize(llm: llama_cpp.Llama, text: str, add_special: bool, parse_special: bool) -> list[int]:
    raw = text.encode("utf-8")
    n_max = len(raw) + 16
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(
        llm._model.vocab, raw, len(raw), buf, n_max, add_special, parse_special
    )
    if n < 0:
        raise RuntimeError(f"tokenize failed ({n}) for {text!r}")
    return list(buf[:n])


def detokenize(llm: llama_cpp.Llama, ids: list[int], special: bool) -> str:
    """llama.cpp's own llama_detokenize (remove_special=False), not the Python wrapper's."""
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, size, False, special)
    if n < 0:
        raise RuntimeError("detokenize buffer too small")
    return buf.raw[:n].decode("utf-8", errors="replace")


def vocab_facts(llm: llama_cpp.Llama) -> dict[str, Any]:
    vocab = llm._model.vocab
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    buf = ctypes.create_string_buffer(512)
    pieces = {False: hashlib.sha256(), True: hashlib.sha256()}
    eog, control = [], []
    for i in range(n):
        for special in (False, True):
            k = llama_cpp.llama_token_to_piece(vocab, i, buf, 512, 0, special)
            assert 0 <= k <= 512
            pieces[special].update(len(buf.raw[:k]).to_bytes(4, "little") + buf.raw[:k])
        if llama_cpp.llama_vocab_is_eog(vocab, i):
            eog.append(i)
        if llama_cpp.llama_vocab_is_control(vocab, i):
            control.append(i)
    return {
        "n_vocab": n,
        "bos_id": llama_cpp.llama_vocab_bos(vocab),
        "eos_id": llama_cpp.llama_vocab_eos(vocab),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        "eog_ids": eog,
        "n_control": len(control),
        "control_sha256": hashlib.sha256(json.dumps(control).encode()).hexdigest(),
        # sha256 over (u32 length + bytes) of llama_token_to_piece for every id, in id order
        "pieces_sha256": pieces[False].hexdigest(),
        "pieces_special_sha256": pieces[True].hexdigest(),
    }


def tokenizer_golden(name: str, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    cases = []
    for text in CORPUS:
        variants = []
        for add_special in (True, False):
            for parse_special in (True, False):
                ids = tokenize(llm, text, add_special, parse_special)
                variants.append(
                    {
                        "add_special": add_special,
                        "parse_special": parse_special,
                        "ids": ids,
                        "text": detokenize(llm, ids, False),
                        "text_special": detokenize(llm, ids, True),
                    }
                )
        cases.append({"text": text, "variants": variants})
    out = {**meta, "vocab": vocab_facts(llm), "cases": cases}
    del llm
    return out


def log_softmax(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def model_goldens(name: str, path: Path, meta: dict[str, Any]) -> tuple[dict, dict]:
    n_ctx = 1024
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=512,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        seed=SEED,
        logits_all=True,
        verbose=False,
    )
    run = {"n_ctx": n_ctx, "n_batch": 512, "n_threads": N_THREADS, "seed": SEED}

    prompts: list[tuple[str, str, bool]] = [
        ("chat", CHAT[name], False),
        ("paragraph", PARAGRAPH, False),
        ("code", CODE, False),
        ("multilingual", MULTILINGUAL, False),
    ]
    if name == "gemma3":  # past the 512-token sliding window
        prompts.append(("long", long_text(640, llm), True))

    logit_cases = []
    for label, text, top1_only in prompts:
        ids = tokenize(llm, text, True, True)
        assert len(ids) < n_ctx, (label, len(ids))
        llm.reset()
        llm.eval(ids)
        scores = np.asarray(llm.scores[: len(ids)])
        positions = []
        for row in scores:
            lp = log_softmax(row)
            if top1_only:
                t = int(np.argmax(row))
                positions.append([t, round(float(lp[t]), LOGP_DIGITS)])
                continue
            top = np.argsort(-row, kind="stable")[:5]
            positions.append(
                {
                    "top1": int(top[0]),
                    "logp": round(float(lp[top[0]]), LOGP_DIGITS),
                    "top5": [[int(t), round(float(lp[t]), LOGP_DIGITS)] for t in top],
                }
            )
        case: dict[str, Any] = {"label": label, "ids": ids}
        if top1_only:
            case["top1_logp"] = positions  # [[id, logp], ...] per position
        else:
            case["positions"] = positions
        logit_cases.append(case)

    greedy_cases = []
    for text in GREEDY_PROMPTS:
        ids = tokenize(llm, text, True, False)
        llm.reset()
        llm.eval(ids)
        generated: list[int] = []
        for _ in range(24):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # temperature 0: argmax
            generated.append(t)
            llm.eval([t])
        greedy_cases.append(
            {
                "prompt": text,
                "prompt_ids": ids,
                "generated": generated,
                "text": detokenize(llm, generated, False),
            }
        )
    del llm
    logits = {
        **meta,
        "run": run,
        "note": "ids fed with add_special=True, parse_special=True; "
        "logp = log-softmax of the full logits row at each position",
        "cases": logit_cases,
    }
    greedy = {
        **meta,
        "run": run,
        "note": "prompt ids with add_special=True, parse_special="
        "False; 24 argmax tokens, not stopped at end-of-generation",
        "cases": greedy_cases,
    }
    return logits, greedy


def kernels() -> str:
    """The vector extensions that pick llama.cpp's CPU kernels here (the name herd's tests
    look goldens up by: tests/integration/test_real_models.py)."""
    info = llama_cpp.llama_print_system_info().decode()
    for name in ("AVX512", "AVX2", "NEON"):
        if f"{name} = 1" in info:
            return name.lower()
    return "generic"


def write(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=False)
    path.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2", type=Path, required=True)
    ap.add_argument("--gemma3", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("tests/testdata"))
    ap.add_argument("--skip-logits", action="store_true", help="tokenizer goldens only")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    np.random.seed(SEED)

    write(args.out / "tokenizer_corpus.json", {"strings": CORPUS})
    cpu = kernels()
    for name, path in (("smollm2", args.smollm2), ("gemma3", args.gemma3)):
        meta = {
            "model": name,
            "model_file": path.name,
            "model_sha256": sha256(path),
            "llama_cpp_python": llama_cpp.__version__,
        }
        write(args.out / f"tokenizer_{name}.json", tokenizer_golden(name, path, meta))
        if not args.skip_logits:
            logits, greedy = model_goldens(name, path, meta)
            write(args.out / f"logits_{name}.{cpu}.json", {**logits, "kernels": cpu})
            write(args.out / f"greedy_{name}.{cpu}.json", {**greedy, "kernels": cpu})


if __name__ == "__main__":
    main()
