"""The tiny cross-encoder of the rerank tests and goldens: a random
BertForSequenceClassification with one label and tests/convert/tiny.py's WordPiece
tokenizer (pair template `[CLS] $A [SEP] $B:1 [SEP]:1`), from seeds, so its converted
tensors are the same on every machine (scripts/make_rerank_goldens.py depends on that)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .tiny import randomize, write_tokenizer

CTX = 64  # max_position_embeddings: the tokenizer's model_max_length too
QUERY = "how many people live in berlin?"
DOCS = [
    "berlin has a population of about 3.5 million registered inhabitants.",
    "new york city is famous for the metropolitan museum of art.",
    "the weather is nice today.",
    "berlin is the capital of germany and its largest city by population.",
    "",
]


def build_cross_encoder(dest: Path, num_labels: int = 1, seed: int = 11) -> Any:
    """A BertForSequenceClassification directory as CrossEncoder.save writes the model
    part: config, weights, the WordPiece tokenizer (pair template with token types)."""
    import transformers

    dest.mkdir(parents=True, exist_ok=True)
    n_vocab = write_tokenizer("wordpiece", dest)
    config = transformers.BertConfig(
        vocab_size=n_vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CTX,
        type_vocab_size=2,
        num_labels=num_labels,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    randomize(model, seed)
    model.save_pretrained(dest)
    return model
