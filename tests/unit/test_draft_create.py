"""Modelfile `DRAFT` at create: parsed, stored as Ollama's draft layer with the config
blob's `draft`, checked against the model's vocabulary before anything is written, shown
by `show --modelfile`, sent to the runner, and taken by `/api/create` as `draft_files`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from herd.errors import BadRequestError, HerdError, ModelfileError
from herd.gguf import open_gguf
from herd.gguf.writer import write_gguf
from herd.modelfile import parse
from herd.options import Options
from herd.store import Store
from herd.store import quantize as q
from herd.store.create import create
from herd.store.facts import load_facts, render_modelfile
from herd.store.layout import CONFIG_V1, MEDIA_DRAFT, MEDIA_MODEL

TOKENS = [f"t{i}" for i in range(40)]


def tiny(path: Path, *, tokens: list[str] = TOKENS, rows: int | None = None,
         extra: dict | None = None, arch: str = "llama") -> Path:  # fmt: skip
    """A small F32 GGUF with a token list; `rows`: token_embd's rows (default: the list's)."""
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
          f"{arch}.context_length": 64, f"{arch}.embedding_length": 32, "general.file_type": 0,
          **(extra or {})}  # fmt: skip
    rng = np.random.default_rng(0)
    tensors = [
        ("token_embd.weight", rng.normal(size=(rows or len(tokens), 32)).astype(np.float32), None),
        ("output_norm.weight", np.ones(32, np.float32), None),
    ]
    return write_gguf(path, arch, kv, tensors)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    tiny(tmp_path / "model.gguf")
    tiny(tmp_path / "draft.gguf")
    return tmp_path


def files(store: Store) -> dict[str, bytes]:
    """Every file under the store, by path, with its bytes."""
    return {str(p.relative_to(store.root)): p.read_bytes()
            for p in sorted(store.root.rglob("*")) if p.is_file()}  # fmt: skip


# ---- the parser ---------------------------------------------------------------------------
def test_draft_is_parsed_and_printed() -> None:
    m = parse("FROM m\nDRAFT ./small.gguf\n")
    assert m.draft is not None and m.draft.args == "./small.gguf"
    assert (m.draft.line, m.draft.column) == (2, 7)
    assert str(m.draft) == "DRAFT ./small.gguf"
    assert parse("FROM m").draft is None


@pytest.mark.parametrize(
    "text,fragment,line,column",
    [
        ("FROM m\nDRAFT", "DRAFT needs a value", 2, 6),
        ('FROM m\nDRAFT ""', "DRAFT needs a value", 2, 7),
        ("FROM m\nDRAFT a.gguf\nDRAFT b.gguf", "too many DRAFT lines", 3, 7),
    ],
)
def test_bad_draft_lines(text: str, fragment: str, line: int, column: int) -> None:
    with pytest.raises(ModelfileError, match=fragment) as info:
        parse(text)
    assert (info.value.line, info.value.column) == (line, column)


# ---- create ------------------------------------------------------------------------------
def test_draft_gguf_becomes_the_draft_layer(src: Path) -> None:
    store = Store(src / "models")
    ref = create(store, "m:1", parse("FROM ./model.gguf\nDRAFT ./draft.gguf\nSYSTEM hi"),
                 base_dir=src)  # fmt: skip
    manifest, _ = store.read_manifest("m:1")
    kinds = [x.media_type for x in manifest.layers]
    assert kinds[:2] == [MEDIA_MODEL, MEDIA_DRAFT]
    draft = manifest.layers[1]
    assert draft.from_ == "draft.gguf"
    assert store.blob_path(draft.digest).read_bytes() == (src / "draft.gguf").read_bytes()
    assert ref.draft == store.blob_path(draft.digest)
    assert manifest.config.media_type == CONFIG_V1
    config = json.loads(store.blob_path(manifest.config.digest).read_bytes())
    assert config["draft"] == {"model_format": "gguf", "architecture": "llama"}
    assert list(config).index("draft") < list(config).index("architecture")  # Go's order
    text = render_modelfile(load_facts("m:1", store))
    assert f"\nDRAFT {ref.draft}\n" in text and text.index("DRAFT") < text.index("SYSTEM")
    # a model derived FROM it inherits the draft; a DRAFT line replaces it
    assert (
        store.resolve(create(store, "d:1", parse("FROM m:1"), base_dir=src).name).draft == ref.draft
    )
    tiny(src / "other.gguf", extra={"general.name": "other"})
    again = create(store, "d:2", parse("FROM m:1\nDRAFT ./other.gguf"), base_dir=src)
    m2, _ = store.read_manifest("d:2")
    assert [x.media_type for x in m2.layers].count(MEDIA_DRAFT) == 1
    assert again.draft is not None and again.draft.read_bytes() == (src / "other.gguf").read_bytes()


def test_draft_by_store_name_uses_its_blob(src: Path) -> None:
    store = Store(src / "models")
    small = create(store, "small:1", parse("FROM ./draft.gguf"), base_dir=src)
    ref = create(store, "m:1", parse("FROM ./model.gguf\nDRAFT small:1"), base_dir=src)
    manifest, _ = store.read_manifest("m:1")
    draft = next(x for x in manifest.layers if x.media_type == MEDIA_DRAFT)
    assert ref.draft == small.model_path and draft.from_ == "small:1"
    # the model as its own draft (the same blob in two layers); deleting one keeps the other's
    create(store, "self:1", parse("FROM small:1\nDRAFT small:1"), base_dir=src)
    assert store.resolve("self:1").draft == store.resolve("self:1").model_path
    store.delete("self:1")
    assert store.resolve("small:1").model_path.is_file()
    with pytest.raises(ModelfileError, match="no model by that name"):
        create(store, "x:1", parse("FROM ./model.gguf\nDRAFT nothere:1"), base_dir=src)


@pytest.mark.parametrize(
    "kind,make,fragment",
    [
        ("swapped", lambda p: tiny(p, tokens=TOKENS[:5] + [TOKENS[6], TOKENS[5]] + TOKENS[7:]),
         "token 5 is 't6', the model's is 't5'"),
        ("shorter", lambda p: tiny(p, tokens=TOKENS[:30]), "has 30 tokens, the model 40"),
        ("padded", lambda p: tiny(p, rows=48), "scores 48 tokens, the model 40"),
        ("embedding", lambda p: tiny(p, extra={"llama.pooling_type": 1}), "embedding"),
        ("adapter", lambda p: tiny(p, extra={"general.type": "adapter"}), "an adapter"),
        ("text", lambda p: (p.write_text("not a gguf"), p)[1], "only GGUF files"),
    ],
)  # fmt: skip
def test_draft_that_cannot_draft_is_refused_and_nothing_written(
    src: Path, kind: str, make, fragment: str
) -> None:
    store = Store(src / "models")
    create(store, "m:1", parse("FROM ./model.gguf"), base_dir=src)
    make(src / "bad.gguf")
    before = files(store)
    with pytest.raises(ModelfileError, match=fragment) as info:
        create(store, "m:2", parse("FROM ./model.gguf\nDRAFT ./bad.gguf"), base_dir=src)
    assert (info.value.line, info.value.column) == (2, 7)
    assert str(info.value).startswith("Modelfile:2:7: DRAFT ./bad.gguf: ")
    assert files(store) == before


def test_draft_quantize(src: Path) -> None:
    store = Store(src / "models")
    with pytest.raises(HerdError, match="requires a DRAFT model"):
        create(store, "m:1", parse("FROM ./model.gguf"), base_dir=src, draft_quantize="q8_0")
    ref = create(store, "m:1", parse("FROM ./model.gguf\nDRAFT ./draft.gguf"), base_dir=src,
                 draft_quantize="q8_0")  # fmt: skip
    assert ref.draft is not None
    assert q.file_type_of(open_gguf(ref.draft)) == "Q8_0"
    assert q.file_type_of(open_gguf(ref.model_path)) == "F32"  # the model is left alone
    # Ollama: a draft that is already quantized is not quantized again
    with pytest.raises(HerdError, match="requires an unquantized draft model, got Q8_0"):
        create(store, "m:2", parse(f"FROM ./model.gguf\nDRAFT {ref.draft}"), base_dir=src,
               draft_quantize="q4_K_M")  # fmt: skip


def test_draft_hugging_face_folder_is_converted(tmp_path: Path) -> None:
    """A DRAFT folder of Hugging Face weights is converted (F16) as FROM converts one."""
    pytest.importorskip("transformers")
    from convert.tiny import build

    from herd.convert import convert

    folder, _ = build("llama-gqa-tied", tmp_path / "hf")
    model = convert(folder, tmp_path / "model.gguf", "f32")
    store = Store(tmp_path / "models")
    ref = create(store, "m:1", parse(f"FROM {model}\nDRAFT {folder}"), base_dir=tmp_path)
    assert ref.draft is not None
    g = open_gguf(ref.draft)
    assert q.file_type_of(g) == "F16"
    assert g.kv["tokenizer.ggml.tokens"] == open_gguf(model).kv["tokenizer.ggml.tokens"]


# ---- the server's side ---------------------------------------------------------------------
def test_load_message_and_memory_carry_the_draft(src: Path) -> None:
    from herd.server.loadspec import LoadSpec, estimate_memory, load_message
    from herd.store.ggufinfo import describe

    store = Store(src / "models")
    plain = create(store, "p:1", parse("FROM ./model.gguf"), base_dir=src)
    drafted = create(store, "m:1", parse("FROM ./model.gguf\nDRAFT ./draft.gguf"), base_dir=src)
    facts = describe(open_gguf(plain.model_path))
    specs = [LoadSpec(r.name, r, facts, r.model_path.stat().st_size, Options(num_ctx=64))
             for r in (plain, drafted)]  # fmt: skip
    assert load_message(specs[0], None, 1)["draft"] is None
    assert load_message(specs[1], None, 1)["draft"] == str(drafted.draft)
    assert estimate_memory(specs[1], 1) > estimate_memory(specs[0], 1)


def test_api_create_takes_draft_files(src: Path) -> None:
    from herd.server.store_api import _draft_quantize, recipe

    store = Store(src / "models")
    digests = {}
    for name in ("model.gguf", "draft.gguf"):
        digests[name] = store.write_blob((src / name).read_bytes(), "").digest
    staging = src / "models" / ".staging"
    staging.mkdir(parents=True)
    body = {"model": "m", "files": {"model.gguf": digests["model.gguf"]},
            "draft_files": {"draft.gguf": digests["draft.gguf"]},
            "draft_quantize": "q8_0"}  # fmt: skip
    modelfile, _ = recipe(store, body, staging)
    assert modelfile.draft is not None
    assert Path(modelfile.draft.args).resolve() == store.blob_path(digests["draft.gguf"])
    assert _draft_quantize(body) == "Q8_0"
    with pytest.raises(BadRequestError, match="requires a DRAFT model"):
        _draft_quantize({"model": "m", "from": "x", "draft_quantize": "q8_0"})
    with pytest.raises(BadRequestError, match="draft_files must be an object"):
        (src / "s2").mkdir()
        recipe(store, {"model": "m", "from": "x", "draft_files": ["a"]}, src / "s2")


def test_cli_create_draft_quantize_and_show(src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`herd create --draft-quantize` (Ollama's flag) and `herd show --modelfile`."""
    from click.testing import CliRunner

    from herd.cli.env import CliEnv
    from herd.cli.main import cli

    monkeypatch.chdir(src)
    (src / "Modelfile").write_text("FROM ./model.gguf\nDRAFT ./draft.gguf\n")
    runner = CliRunner()
    r = runner.invoke(cli, ["create", "m", "--draft-quantize", "q8_0"], obj=CliEnv())
    assert r.exit_code == 0, r.output
    ref = Store().resolve("m")
    assert ref.draft is not None and q.file_type_of(open_gguf(ref.draft)) == "Q8_0"
    r = runner.invoke(cli, ["show", "m", "--modelfile"], obj=CliEnv())
    assert f"\nDRAFT {ref.draft}\n" in r.stdout
