"""Tiny Hugging Face model directories, built from seeds, for the converter tests and goldens.

Each case is what `save_pretrained` writes for a small random model of one architecture
with its quirks switched on, plus tokenizer files trained on a small corpus. Weights come
from NumPy's PCG64 generator (not torch's initializers), so a case's tensors are the same
on every machine: the per-tensor sha256 goldens and the llama.cpp logits in
tests/testdata/convert/ (scripts/make_convert_goldens.py) depend only on the case.

Needs torch, transformers, tokenizers and sentencepiece (the `test` extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).parent.parent / "testdata"
GOLDENS = DATA / "convert"
CORPUS: list[str] = json.loads((DATA / "tokenizer_corpus.json").read_text())["strings"]

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Case:
    arch: str  # herd / GGUF architecture
    hf_class: str  # transformers model class
    config: dict[str, Any]
    tokenizer: str  # llama3-bpe | qwen2-bpe | spm-llama | spm-gemma | wordpiece
    quirks: str
    seed: int
    extra_vocab: int = 0  # config vocab_size beyond the tokenizer's (padding rows)
    files: dict[str, Any] = field(default_factory=dict)  # extra JSON files to write


_DIMS = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)

CASES: dict[str, Case] = {
    "llama-gqa-tied": Case(
        "llama",
        "LlamaForCausalLM",
        dict(
            _DIMS,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            max_position_embeddings=256,
        ),
        "llama3-bpe",
        "GQA, tied embeddings, byte-level BPE (llama-bpe)",
        1,
    ),
    "llama-rope3-spm": Case(
        "llama",
        "LlamaForCausalLM",
        dict(
            _DIMS,
            num_key_value_heads=1,
            tie_word_embeddings=False,
            max_position_embeddings=256,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "rope_theta": 500000.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        "spm-llama",
        "MQA, Llama 3.1 rope scaling (rope_freqs), SentencePiece",
        2,
    ),
    "mistral": Case(
        "llama",
        "MistralForCausalLM",
        dict(
            _DIMS,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=None,
            max_position_embeddings=256,
        ),
        "spm-llama",
        "Mistral as llama, SentencePiece",
        3,
    ),
    "qwen2-bias": Case(
        "qwen2",
        "Qwen2ForCausalLM",
        dict(_DIMS, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256),
        "qwen2-bpe",
        "QKV bias, GQA, tied, padded vocabulary, qwen2 pre-tokenizer",
        4,
        extra_vocab=9,
    ),
    "qwen3-qknorm": Case(
        "qwen3",
        "Qwen3ForCausalLM",
        dict(
            _DIMS,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=False,
            max_position_embeddings=256,
        ),
        "qwen2-bpe",
        "QK-norm, head_dim != hidden/heads, GQA, untied",
        5,
    ),
    "qwen3moe-top2": Case(
        "qwen3moe",
        "Qwen3MoeForCausalLM",
        dict(
            _DIMS,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            tie_word_embeddings=False,
            max_position_embeddings=256,
        ),
        "qwen2-bpe",
        "sparse MoE (4 experts, top-2, renormalized), per-expert checkpoint, QK-norm, GQA",
        12,  # a seed whose routers never nearly tie (2nd vs 3rd expert >= 0.01 on the inputs)
    ),
    "gemma3-swa": Case(
        "gemma3",
        "Gemma3ForCausalLM",
        dict(
            _DIMS,
            num_hidden_layers=6,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            final_logit_softcapping=30.0,
            max_position_embeddings=256,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
        "spm-gemma",
        "5 local : 1 global sliding window, 1 + w norms, soft-capping, QK-norm, "
        "GeGLU, tied, SentencePiece without space prefix",
        6,
    ),
    "bert-mean": Case(
        "bert",
        "BertModel",
        dict(_DIMS, max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12),
        "wordpiece",
        "sentence-transformers directory, mean pooling, WordPiece",
        7,
        files={
            "modules.json": [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                },
            ],
            "1_Pooling/config.json": {
                "word_embedding_dimension": 64,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
            },
        },
    ),
}

# Teacher-forced inputs for logits / embeddings (ids below every case's vocabulary size).
N_IDS = 20


def input_ids(case: str, n_vocab: int) -> list[int]:
    rng = np.random.default_rng(1000 + CASES[case].seed)
    return [int(i) for i in rng.integers(3, n_vocab, size=N_IDS)]


# --- tokenizers -------------------------------------------------------------------------

_TRAIN = CORPUS * 2 + [s.lower() for s in CORPUS]


def _bpe(dest: Path, regex: str, llama3: bool) -> int:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bos, eos = ("<|begin_of_text|>", "<|end_of_text|>") if llama3 else (None, "<|endoftext|>")
    specials = [t for t in (bos, eos, "<|im_start|>", "<|im_end|>") if t]
    tok = Tokenizer(models.BPE(ignore_merges=llama3))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        _TRAIN,
        trainers.BpeTrainer(
            vocab_size=360,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    if llama3:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 0)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(dest / "tokenizer.json"))
    config = {
        "eos_token": eos,
        "chat_template": CHATML,
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if llama3:
        config.update(bos_token=bos, add_bos_token=True)
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return tok.get_vocab_size()


def _spm(dest: Path, gemma: bool) -> int:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    ids: dict[str, Any] = (
        dict(
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
        )
        if gemma
        else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    )
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TRAIN),
        model_writer=model,
        model_type="bpe",
        vocab_size=600,
        byte_fallback=True,
        character_coverage=0.98,
        num_threads=1,
        add_dummy_prefix=not gemma,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"] if gemma else [],
        max_sentence_length=4096,
        minloglevel=2,
        **ids,
    )
    (dest / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    config: dict[str, Any] = {
        "bos_token": "<bos>" if gemma else "<s>",
        "eos_token": "<eos>" if gemma else "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
    }
    if gemma:
        config["pad_token"] = "<pad>"
        config["added_tokens_decoder"] = {
            str(sp.piece_to_id(t)): {"content": t, "special": True}
            for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
        }
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return sp.get_piece_size()


def _wordpiece(dest: Path) -> int:
    """A WordPiece vocabulary picked by counting (the `tokenizers` trainer is not
    deterministic across runs): every character, `##` ASCII letters and digits, then the
    most frequent lowercase words and word endings."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in _TRAIN:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = specials + chars + ["##" + c for c in chars if c.isascii() and c.isalnum()]
    endings = Counter(w[i:] for w in words for i in range(1, len(w) - 1))
    ranked = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))]
    ranked += ["##" + e for e, _ in sorted(endings.items(), key=lambda kv: (-kv[1], kv[0]))]
    vocab += [w for w in ranked if w not in vocab][: 600 - len(vocab)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tok.add_special_tokens(specials)
    tok.save(str(dest / "tokenizer.json"))
    config = {t.strip("[]").lower() + "_token": t for t in specials}
    config.update(do_lower_case=True, tokenizer_class="BertTokenizer", model_max_length=64)
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return tok.get_vocab_size()


def write_tokenizer(kind: str, dest: Path) -> int:
    """Tokenizer files of one kind in `dest`; returns the vocabulary size."""
    if kind in ("llama3-bpe", "qwen2-bpe"):
        return _bpe(
            dest, LLAMA3_REGEX if kind == "llama3-bpe" else QWEN2_REGEX, kind == "llama3-bpe"
        )
    if kind in ("spm-llama", "spm-gemma"):
        return _spm(dest, kind == "spm-gemma")
    if kind == "wordpiece":
        return _wordpiece(dest)
    raise ValueError(kind)


# --- models -----------------------------------------------------------------------------


def randomize(model: Any, seed: int) -> None:
    """Overwrite every parameter from NumPy's generator (norms around 1, weights ~0.1)."""
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            values = rng.standard_normal(shape).astype(np.float32)
            if "norm" in name.lower() and len(shape) == 1 and name.endswith("weight"):
                values = 1.0 + 0.1 * values
            elif len(shape) == 1:
                values = 0.1 * values
            else:
                values = values / np.sqrt(shape[-1]).astype(np.float32)
            p.copy_(torch.from_numpy(values))


def build_model(name: str, n_vocab: int) -> Any:
    import transformers

    case = CASES[name]
    cfg_class = getattr(
        transformers, case.hf_class.replace("ForCausalLM", "Config").replace("Model", "Config")
    )
    if case.arch == "gemma3":
        cfg_class = transformers.Gemma3TextConfig
    config = cfg_class(vocab_size=n_vocab, **case.config)
    model = getattr(transformers, case.hf_class)(config).eval()
    randomize(model, case.seed)
    return model


def build(name: str, dest: Path) -> tuple[Path, Any]:
    """Write case `name` as a Hugging Face directory in `dest`; returns (dest, model)."""
    case = CASES[name]
    dest.mkdir(parents=True, exist_ok=True)
    n_vocab = write_tokenizer(case.tokenizer, dest) + case.extra_vocab
    model = build_model(name, n_vocab)
    model.save_pretrained(dest)
    for rel, content in case.files.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(json.dumps(content, indent=1))
    return dest, model


def hf_logits(model: Any, ids: list[int]) -> np.ndarray:
    """(len(ids), n_vocab) float32 logits, or (1, n_embd) mean-pooled normalized embedding."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]))
    if hasattr(out, "logits"):
        return out.logits[0].float().numpy()
    h = out.last_hidden_state[0].float().numpy().mean(axis=0, keepdims=True)
    return h / np.linalg.norm(h, axis=1, keepdims=True)
