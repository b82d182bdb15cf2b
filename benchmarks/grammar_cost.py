"""What structured outputs cost per token: llguidance's mask against herd's decode time.

    python -m benchmarks.grammar_cost [--model smollm2:135m] [--backend numpy] [--runs 2]

For each format (`"json"` and four JSON schemas) the same chat prompt is answered greedily
with the grammar on, and each generated token's costs are split into: computing the mask
(llguidance) and applying it to the logits row, advancing the matcher with the chosen
token, and the whole decode step (model forward + sampling, from the runner's eval
duration). Also reported: llguidance's one-time view of the vocabulary and the unconstrained
decode time per token on the same prompt. The target (issue 8) is under 10% of decode.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

SCHEMAS: dict[str, Any] = {
    "json": "json",
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "age", "address"],
    },
    "list": {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"type": "string"}, "maxItems": 6}},
        "required": ["items"],
    },
    "enum+number": {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["sentiment", "confidence"],
    },
    "nested-array": {
        "type": "object",
        "properties": {
            "steps": {
                "type": "array",
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {
                        "n": {"type": "integer", "minimum": 1, "maximum": 9},
                        "action": {"type": "string", "maxLength": 30},
                    },
                    "required": ["n", "action"],
                },
            }
        },
        "required": ["steps"],
    },
}
PROMPT = "Describe a person, a shopping list and how to make tea, as JSON."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--num-predict", type=int, default=64)
    args = ap.parse_args()

    import herd
    from herd.options import Options
    from herd.sample.grammar import Grammar, grammar_tokenizer

    llm = herd.load(args.model, backend=args.backend)
    t0 = time.perf_counter()
    grammar_tokenizer(llm.tokenizer)
    vocab_s = time.perf_counter() - t0
    opts = llm.defaults.merged({"temperature": 0, "num_predict": args.num_predict})
    assert isinstance(opts, Options)
    tokens = llm.tokenize(llm.render([{"role": "user", "content": PROMPT}]), parse_special=True)
    runner = llm.runner(opts)

    def decode_ms(grammar: Grammar | None) -> tuple[float, int]:
        events = list(runner.generate(tokens, opts, grammar=grammar))
        done = events[-1]
        return done.eval_duration / 1e6 / max(done.eval_count, 1), done.eval_count

    decode_ms(None)  # warm-up
    free = statistics.median(decode_ms(None)[0] for _ in range(args.runs))
    print(
        f"model {args.model} ({args.backend}), vocabulary {llm.tokenizer.n_vocab} tokens; "
        f"llguidance vocabulary view built once in {vocab_s * 1e3:.0f} ms"
    )
    print(f"unconstrained decode: {free:.1f} ms/token")
    print(
        f"{'format':<14}{'tokens':>7}{'decode ms/tok':>15}{'mask us/tok':>13}"
        f"{'accept us/tok':>15}{'grammar % of decode':>21}"
    )
    shares = []
    for name, fmt in SCHEMAS.items():
        rows = []
        for _ in range(args.runs):
            g = Grammar.from_format(llm.tokenizer, fmt)
            assert g is not None
            ms, n = decode_ms(g)
            rows.append((ms, n, g.mask_ns / 1e3 / max(g.masks, 1), g.accept_ns / 1e3 / max(n, 1)))
        ms, n, mask_us, accept_us = (statistics.median(r[i] for r in rows) for i in range(4))
        share = 100 * (mask_us + accept_us) / 1e3 / ms
        shares.append(share)
        print(f"{name:<14}{int(n):>7}{ms:>15.1f}{mask_us:>13.0f}{accept_us:>15.0f}{share:>20.1f}%")
    print(f"grammar cost: {min(shares):.1f}-{max(shares):.1f}% of decode time (target < 10%)")


if __name__ == "__main__":
    main()
