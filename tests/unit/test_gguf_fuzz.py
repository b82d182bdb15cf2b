"""Model files that cannot make herd misbehave: mutated and generated GGUFs through the
reader, `herd show -v` and both backends' loaders end in a load or a HerdError, never
anything else, in bounded time and memory; and one regression test with the minimal input
for each bug the fuzzing found (issue 22).

The mutators and seed files are scripts/fuzz_gguf.py's (`make fuzz` runs it on 10,000
mutants, each in a child process with time and memory bounds); here Hypothesis draws a
bounded, derandomized sample in-process.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import herd
from herd.errors import GGUFError, HerdError, TokenizerError
from herd.gguf import Config, open_gguf
from herd.gguf.writer import kv_entry
from herd.ml import available_backends
from herd.ml.layout import estimate

_SCRIPT = Path(__file__).parents[2] / "scripts" / "fuzz_gguf.py"
_spec = importlib.util.spec_from_file_location("fuzz_gguf", _SCRIPT)
assert _spec is not None and _spec.loader is not None
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_gguf"] = fuzz
_spec.loader.exec_module(fuzz)

BACKENDS = tuple(b for b in ("numpy", "ggml") if b in available_backends())
SECONDS = 10.0  # one file through everything, far more than a tiny file needs


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, bytes, Any]]:
    paths = fuzz.seed_files(tmp_path_factory.mktemp("seeds"))
    return [(p, p.read_bytes(), fuzz.field_map(p.read_bytes())) for p in paths]


def _through_everything(path: Path) -> list[str]:
    """The script's check (reader, show -v, numpy and ggml loads): only HerdError may
    escape, within SECONDS."""
    t0 = time.monotonic()
    try:
        done = fuzz.check(path, BACKENDS)
    except HerdError:
        done = []
    assert time.monotonic() - t0 < SECONDS
    return done


def test_seed_files_load_everywhere(seeds):
    for path, _, _ in seeds:
        assert _through_everything(path) == ["read", "show", *BACKENDS]


_FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_FUZZ
@given(which=st.integers(0, 1), seed=st.integers(0, 2**32 - 1))
def test_mutated_files_load_or_raise_herd_errors(seeds, tmp_path, which, seed):
    _, data, fields = seeds[which]
    path = tmp_path / "mutant.gguf"
    path.write_bytes(fuzz.mutate(data, fields, np.random.default_rng(seed)))
    _through_everything(path)


@_FUZZ
@given(which=st.integers(0, 1), seed=st.integers(0, 2**32 - 1))
def test_wrong_typed_metadata_loads_or_raises_herd_errors(seeds, tmp_path, which, seed):
    path = tmp_path / "retyped.gguf"
    path.write_bytes(fuzz.retype(seeds[which][0], np.random.default_rng(seed)))
    _through_everything(path)


@_FUZZ
@given(data=st.binary(min_size=0, max_size=400))
def test_arbitrary_bytes_after_the_magic_raise_gguf_errors(tmp_path, data):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + data)
    try:
        open_gguf(path)
    except GGUFError:
        pass


# ---- regressions: the minimal input of each bug ------------------------------------------


def _string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _tensor(name: str | bytes, ne: list[int], qtype: int = 0, offset: int = 0) -> bytes:
    return _string(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, qtype, offset)


def _file(
    tmp: Path,
    kv: list[bytes] = (),  # type: ignore[assignment]
    tensors: list[bytes] = (),  # type: ignore[assignment]
    data: bytes = b"",
    counts: tuple[int, int] | None = None,
    align: int = 32,
) -> Path:
    """A GGUF v3 from raw parts (counts as given, else the parts' own)."""
    kv = [kv_entry("general.architecture", "llama"), *kv]
    n_tensors, n_kv = counts if counts is not None else (len(tensors), len(kv))
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + b"".join(kv) + b"".join(tensors)
    path = tmp / "min.gguf"
    path.write_bytes(head + bytes(-len(head) % align) + data)
    return path


def _refused(path: Path, *words: str) -> str:
    with pytest.raises(GGUFError) as e:
        open_gguf(path)
    for w in words:
        assert w in str(e.value), str(e.value)
    return str(e.value)


def test_a_string_length_past_the_end_is_refused_before_it_is_copied(tmp_path):
    # was: a 2^62-byte key length reached bytes(take(n)) (MemoryError / OverflowError)
    path = _file(tmp_path, kv=[struct.pack("<Q", 1 << 62) + b"key"])
    _refused(path, "metadata key 1", "runs past the end")


def test_a_string_array_count_is_checked_before_allocating(tmp_path):
    # was: a count of 2^27 allocated [""] * 2^27 (1 GB) for a tiny file
    entry = _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 27)
    path = _file(tmp_path, kv=[entry])
    tracemalloc.start()
    try:
        _refused(path, "tokenizer.ggml.tokens", str(1 << 27), "strings")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_numeric_array_count_past_the_end_is_refused(tmp_path):
    # was: OverflowError in take() for n * itemsize beyond 2^63
    entry = _string("a") + struct.pack("<IIQ", 9, 10, (1 << 64) - 1)
    _refused(_file(tmp_path, kv=[entry]), "'a'", "values runs past the end")


def test_unknown_value_types_and_nested_arrays_are_refused(tmp_path):
    _refused(_file(tmp_path, kv=[_string("a") + struct.pack("<I", 13)]), "value type 13")
    nested = _string("a") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 0, 0)
    _refused(_file(tmp_path, kv=[nested]), "arrays of GGUF value type 9")


def test_huge_counts_are_refused_before_iterating(tmp_path):
    # was: loops of up to 2^64 iterations, ending only at the end of the file (a hang on
    # a large model)
    _refused(_file(tmp_path, counts=(0, 1 << 63)), "metadata count")
    _refused(_file(tmp_path, counts=(1 << 40, 1)), "tensor count")
    path = _file(tmp_path, tensors=[_string("t") + struct.pack("<I", 0xFFFFFFFF)])
    _refused(path, "n_dims", str(0xFFFFFFFF))


def test_duplicate_metadata_keys_are_refused(tmp_path):
    _refused(_file(tmp_path, kv=[kv_entry("a", 1), kv_entry("a", 2)]), "duplicate key")


@pytest.mark.parametrize(
    ("ne", "qtype", "words"),
    [
        ([0, 4], 0, "not positive"),  # was: ZeroDivisionError in the numpy backend's _load
        ([1 << 62, 1 << 62], 0, "too large"),  # was: OverflowError in np.prod
        ([1, 1, 1, 1, 1], 0, "5 dims"),  # over GGML_MAX_DIMS
        ([16], 8, "not a multiple of the Q8_0 block"),  # was: ValueError in _load's reshape
        ([4], 99, "unknown tensor type id 99"),
        ([4], 4, "unknown tensor type id 4"),  # Q4_2: removed from ggml
    ],
)
def test_bad_tensor_shapes_and_types_are_refused(tmp_path, ne, qtype, words):
    _refused(_file(tmp_path, tensors=[_tensor("t", ne, qtype)], data=bytes(64)), words)


def test_long_tensor_names_are_refused(tmp_path):
    # was: a 6 MB name, which `herd show -v` printed 160 times over
    _refused(_file(tmp_path, tensors=[_tensor("x" * 64, [4])], data=bytes(16)), "63 bytes")
    assert open_gguf(_file(tmp_path, tensors=[_tensor("x" * 63, [4])], data=bytes(16)))


@pytest.mark.parametrize("align", [0, 3, 48, -32])
def test_alignment_must_be_a_positive_power_of_two(tmp_path, align):
    # was: ZeroDivisionError for 0; llama.cpp refuses every non-power of two
    entry = kv_entry("general.alignment", align)
    _refused(_file(tmp_path, kv=[entry], tensors=[_tensor("t", [4])]), "general.alignment")


def test_tensor_data_must_be_aligned_in_bounds_unique_and_apart(tmp_path):
    data = bytes(128)
    unaligned = [_tensor("a", [4], 0, 4)]
    _refused(_file(tmp_path, tensors=unaligned, data=data), "'a'", "multiple of the alignment")
    past = [_tensor("a", [64], 0, 0)]
    _refused(_file(tmp_path, tensors=past, data=data), "'a'", "past the end")
    overlap = [_tensor("a", [16], 0, 0), _tensor("b", [16], 0, 32)]
    _refused(_file(tmp_path, tensors=overlap, data=data), "'a'", "'b'", "overlap")
    twice = [_tensor("a", [4], 0, 0), _tensor("a", [4], 0, 32)]
    _refused(_file(tmp_path, tensors=twice, data=data), "duplicate tensor name")
    apart = [_tensor("a", [8], 0, 0), _tensor("b", [8], 0, 32)]
    assert [t.offset % 32 for t in open_gguf(_file(tmp_path, tensors=apart, data=data))] == [0, 0]


@pytest.mark.parametrize("value", ["", "12", float("nan"), float("inf"), [1, 2], None])
def test_config_refuses_wrong_typed_numbers_naming_the_key(value):
    # was: TypeError, ValueError or OverflowError from int() / float() on the raw value
    cfg = Config({"llama.block_count": value}, "llama")
    with pytest.raises(GGUFError, match="llama.block_count"):
        cfg.int("block_count")
    if not isinstance(value, float):
        with pytest.raises(GGUFError, match="llama.block_count"):
            cfg.float("block_count")
    assert Config({"llama.n": 4.0}, "llama").int("n") == 4


@pytest.mark.parametrize(
    ("kv", "key"),
    [
        ({"llama.attention.head_count": ""}, "head_count"),  # was: ValueError in _largest
        ({"llama.attention.head_count": ["a"]}, "head_count"),  # was: ValueError
        ({"llama.feed_forward_length": [[1]]}, "feed_forward_length"),  # was: TypeError
        ({"llama.attention.head_count_kv": [float("nan")]}, "head_count_kv"),  # ValueError
        ({"llama.block_count": 1 << 40}, "block_count"),  # was: a list of 2^40 layers
        ({"llama.attention.head_count": -4}, "head_count"),
    ],
)
def test_the_memory_estimate_refuses_bad_metadata_naming_the_key(kv, key):
    kv = {"general.architecture": "llama", "llama.block_count": 2,
          "llama.attention.head_count": 4, "llama.embedding_length": 16, **kv}  # fmt: skip
    with pytest.raises(GGUFError, match=key):
        estimate(kv, 0, num_ctx=64, num_batch=8)


def _retyped(seed: Path, tmp: Path, **changes: Any) -> Path:
    """The seed file with metadata keys replaced (None: removed)."""
    from herd.gguf.writer import GGUFStream

    g = open_gguf(seed)
    kv = {**g.kv, **changes}
    entries = [fuzz._entry(k, v) for k, v in kv.items() if v is not None]
    path = tmp / "retyped.gguf"
    with open(path, "wb") as f:
        stream = GGUFStream(f.write, entries, [(t.name, t.shape, t.type) for t in g], 32)
        for t in g:
            stream.tensor(bytes(g.raw(t.name)))
    return path


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tokenizer.ggml.tokens", []),  # an empty vocabulary
        ("tokenizer.ggml.tokens", [1, 2, 3]),
        ("tokenizer.ggml.token_type", 3),  # was: TypeError: len() of an int
        ("tokenizer.ggml.scores", ["a"]),
        ("tokenizer.ggml.bos_token_id", "1"),  # was: ValueError in read_vocab's special()
        ("tokenizer.ggml.eos_token_id", float("nan")),  # was: ValueError
        ("tokenizer.ggml.eos_token_ids", [float("inf")]),  # was: OverflowError
        ("tokenizer.ggml.pre", ["llama-bpe"]),  # was: TypeError: unhashable list
        ("tokenizer.ggml.model", 7),
        ("tokenizer.ggml.add_bos_token", "yes"),
    ],
)
def test_wrong_typed_tokenizer_metadata_is_a_gguf_error_naming_the_key(seeds, tmp_path, key, value):
    path = _retyped(seeds[0][0], tmp_path, **{key: value})
    with pytest.raises(GGUFError, match=key):
        herd.load(path, backend="numpy")


def test_a_short_token_type_array_is_a_tokenizer_error_naming_the_key(seeds, tmp_path):
    path = _retyped(seeds[0][0], tmp_path, **{"tokenizer.ggml.token_type": [1, 1]})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.token_type has 2 entries"):
        herd.load(path, backend="numpy")


def test_show_verbose_output_is_bounded(seeds, tmp_path):
    # was: a 6 MB value or name printed whole (952 MB for one file)
    from herd.cli.show import MAX_TEXT, render_info
    from herd.store.facts import load_facts
    from herd.store.store import Store

    long = "y" * (1 << 20)
    path = _retyped(seeds[0][0], tmp_path, **{"general.name": long, "x.list": [long, "z"]})
    text = render_info(load_facts(str(path), Store(tmp_path / "store")), verbose=True)
    assert len(text) < 64 * 1024
    assert f"{'y' * MAX_TEXT}...(+{(1 << 20) - MAX_TEXT} characters)" in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_zero_head_count_is_a_gguf_error_naming_the_key(seeds, tmp_path, backend):
    # was: ZeroDivisionError in the llama model's n_embd // n_head
    path = _retyped(seeds[0][0], tmp_path, **{"llama.attention.head_count": 0})
    with pytest.raises(GGUFError, match="llama.attention.head_count: 0"):
        herd.load(path, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_missing_tensor_is_a_weight_error(seeds, tmp_path, backend):
    # was: KeyError from the backend's weight() for token_embd.weight
    from herd.errors import WeightError
    from herd.gguf.writer import GGUFStream

    g = open_gguf(seeds[0][0])
    path = tmp_path / "no-embd.gguf"
    kept = [t for t in g if t.name != "token_embd.weight"]
    with open(path, "wb") as f:
        entries = [fuzz._entry(k, v) for k, v in g.kv.items()]
        stream = GGUFStream(f.write, entries, [(t.name, t.shape, t.type) for t in kept], 32)
        for t in kept:
            stream.tensor(bytes(g.raw(t.name)))
    with pytest.raises(WeightError, match="token_embd.weight: missing"):
        herd.load(path, backend=backend)
