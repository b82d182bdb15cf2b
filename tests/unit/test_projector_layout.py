"""llama.cpp's two-file layout for vision models: a text GGUF plus a projector GGUF
(`mmproj`, `general.architecture` "clip"), from `herd create` and `herd run --mmproj`
through the store, the server's load message and the memory estimate, down to `Loaded`
handing the architecture the projector on a backend of its own."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _store_helpers import write_gguf as write_text_gguf
from click.testing import CliRunner
from gguf import GGMLQuantizationType

from herd.cli.env import CliEnv
from herd.cli.main import cli
from herd.errors import BadRequestError, GGUFError, HerdError, UnsupportedModelError
from herd.gguf import open_gguf
from herd.gguf.writer import write_gguf
from herd.ml import open_backend
from herd.modelfile import parse
from herd.models import load_model, registry
from herd.models.base import Projector, TakesProjector
from herd.options import Options
from herd.runner.loaded import Loaded, Source
from herd.runner.serve import Child
from herd.server import scheduler as sched
from herd.server.metrics import Metrics
from herd.server.service import Service
from herd.store import Store
from herd.store.create import create
from herd.store.facts import load_facts
from herd.store.layout import MEDIA_MODEL, MEDIA_PROJECTOR, MEDIA_SYSTEM

CLIP_KV = {
    "general.type": "mmproj",
    "clip.has_vision_encoder": True,
    "clip.projector_type": "gemma3",
    "clip.vision.image_size": 28,
    "clip.vision.patch_size": 14,
    "clip.vision.embedding_length": 8,
    "clip.vision.feed_forward_length": 16,
    "clip.vision.attention.head_count": 2,
    "clip.vision.block_count": 1,
    "clip.vision.projection_dim": 8,
}


def write_clip(path: Path, seed: int = 0) -> Path:
    """A tiny projector file as llama.cpp's converter names it (`v.*`, `mm.*`)."""
    rng = np.random.default_rng(seed)
    tensors = [
        ("v.patch_embd.weight", rng.standard_normal((8, 3, 14, 14)).astype(np.float32), None),
        ("v.blk.0.attn_q.weight", rng.standard_normal((8, 8)).astype(np.float32), None),
        ("mm.input_projection.weight", rng.standard_normal((8, 8)).astype(np.float32), None),
    ]
    return write_gguf(path, "clip", CLIP_KV, tensors)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    write_text_gguf(tmp_path / "text.gguf")
    write_clip(tmp_path / "mmproj.gguf")
    return tmp_path


def layer_types(store: Store, name: str) -> list[str]:
    return [x.media_type for x in store.read_manifest(name)[0].layers]


# ---- create ---------------------------------------------------------------------------------
def test_two_froms_make_a_model_and_a_projector_layer_in_either_order(src: Path) -> None:
    store = Store(src / "models")
    create(store, "a", parse("FROM ./text.gguf\nFROM ./mmproj.gguf\nSYSTEM hi"), base_dir=src)
    create(store, "b", parse("FROM ./mmproj.gguf\nFROM ./text.gguf\nSYSTEM hi"), base_dir=src)
    manifest, data = store.read_manifest("a")
    assert layer_types(store, "a") == [MEDIA_MODEL, MEDIA_PROJECTOR, MEDIA_SYSTEM]
    model, projector = manifest.layers[:2]
    assert (model.from_, projector.from_) == ("text.gguf", "mmproj.gguf")
    for layer, file in ((model, "text.gguf"), (projector, "mmproj.gguf")):
        assert store.blob_path(layer.digest).read_bytes() == (src / file).read_bytes()
        assert layer.size == (src / file).stat().st_size
    assert store.read_manifest("b")[1] == data  # the files, not their order, decide
    config = json.loads(store.blob_path(manifest.config.digest).read_bytes())
    assert (config["model_family"], config["model_families"]) == ("llama", ["llama", "clip"])
    ref = store.resolve("a")
    assert ref.projector == store.blob_path(projector.digest)
    facts = load_facts("a", store)
    assert facts.projector is not None and facts.projector.architecture == "clip"
    assert "vision" in facts.capabilities


def test_a_folder_holding_a_model_and_its_projector_is_both(src: Path) -> None:
    folder = src / "pair"
    folder.mkdir()
    for name in ("text.gguf", "mmproj.gguf"):
        (folder / name).write_bytes((src / name).read_bytes())
    store = Store(src / "models")
    create(store, "pair", parse("FROM ./pair"), base_dir=src)
    assert layer_types(store, "pair") == [MEDIA_MODEL, MEDIA_PROJECTOR]


def test_from_a_model_keeps_its_projector_and_a_new_file_replaces_it(src: Path) -> None:
    store = Store(src / "models")
    create(store, "base", parse("FROM ./text.gguf\nFROM ./mmproj.gguf"), base_dir=src)
    old = store.resolve("base").projector
    create(store, "child", parse("FROM base\nSYSTEM be brief"), base_dir=src)
    assert layer_types(store, "child") == [MEDIA_MODEL, MEDIA_PROJECTOR, MEDIA_SYSTEM]
    assert store.resolve("child").projector == old
    write_clip(src / "other.gguf", seed=1)
    create(store, "swapped", parse("FROM ./other.gguf\nFROM base"), base_dir=src)
    assert layer_types(store, "swapped") == [MEDIA_MODEL, MEDIA_PROJECTOR]
    new = store.resolve("swapped").projector
    assert new is not None and new != old
    assert new.read_bytes() == (src / "other.gguf").read_bytes()
    # a text-only model gets a projector from a second FROM, too
    create(store, "text", parse("FROM ./text.gguf"), base_dir=src)
    assert store.resolve("text").projector is None
    create(store, "text-vision", parse("FROM text\nFROM ./mmproj.gguf"), base_dir=src)
    assert store.resolve("text-vision").projector == old


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("FROM ./mmproj.gguf", "Modelfile:1:6: FROM ./mmproj.gguf: mmproj.gguf is a projector"),
        (
            "FROM ./text.gguf\nFROM ./text2.gguf",
            "Modelfile:2:6: FROM ./text2.gguf: two models (text.gguf and text2.gguf)",
        ),
        ("FROM ./text.gguf\nFROM ./notes.gguf", "not a GGUF file"),
        (
            "FROM ./text.gguf\nFROM ./mmproj.gguf\nFROM ./mmproj2.gguf",
            "Modelfile:3:6: too many FROM lines",
        ),
        (
            "FROM ./mmproj.gguf\nFROM ./mmproj2.gguf",
            "Modelfile:2:6: FROM ./mmproj2.gguf: a second projector file (mmproj2.gguf)",
        ),
        ("FROM ./text.gguf\nFROM ./two", "holds several GGUF files (a.gguf, b.gguf)"),
    ],
    ids=[
        "projector-alone",
        "two-text-models",
        "not-gguf-projector",
        "three",
        "two-projectors",
        "folder-of-two-projectors",
    ],  # fmt: skip
)
def test_bad_pairs_are_clear_errors_and_leave_the_store_unchanged(
    src: Path, text: str, fragment: str
) -> None:
    write_text_gguf(src / "text2.gguf", template="other")
    write_clip(src / "mmproj2.gguf", seed=2)
    (src / "notes.gguf").write_text("not a gguf at all, just some text")
    (src / "two").mkdir()
    write_clip(src / "two" / "a.gguf", seed=3)
    write_clip(src / "two" / "b.gguf", seed=4)
    store = Store(src / "models")
    create(store, "keep", parse("FROM ./text.gguf"), base_dir=src)
    before = sorted(p.name for p in store.blobs_dir.iterdir())
    with pytest.raises(HerdError) as info:
        create(store, "new", parse(text), base_dir=src)
    assert fragment in str(info.value)
    assert sorted(p.name for p in store.blobs_dir.iterdir()) == before
    assert [n.model for n in store.names()] == ["keep"]


# ---- the server: load message, reload, memory -----------------------------------------------
def test_the_load_message_carries_the_projector_and_the_estimate_counts_it(src: Path) -> None:
    store = Store(src / "models")
    create(store, "split", parse("FROM ./text.gguf\nFROM ./mmproj.gguf"), base_dir=src)
    create(store, "text", parse("FROM ./text.gguf"), base_dir=src)
    scheduler = sched.Scheduler(max_loaded=1, max_queue=1, keep_alive=1.0, load_timeout=1.0,
                                memory_limit=None, num_parallel=2, backend="numpy")  # fmt: skip
    service = Service(store, scheduler, Metrics())

    async def specs() -> tuple[sched.LoadSpec, sched.LoadSpec]:
        split = await service.load_spec(service.model("split"), {"num_ctx": 64})
        text = await service.load_spec(service.model("text"), {"num_ctx": 64})
        return split, text

    split, text = asyncio.run(specs())
    projector = store.resolve("split").projector
    assert projector is not None
    assert split.projector is not None and split.projector.architecture == "clip"
    assert split.projector_size == projector.stat().st_size
    assert (text.projector, text.projector_size) == (None, 0)
    message = sched.load_message(split, "numpy", 2)
    assert message["projector"] == str(projector)
    assert message["path"] == str(store.resolve("split").model_path)
    assert (message["backend"], message["parallel"]) == ("numpy", 2)
    assert sched.load_message(text, None, 1)["projector"] is None
    # the image encoder's buffer: 4 patches of 8 dims, 2 heads' 4x4 scores, the pixels
    extra = 4 * (3 * 28 * 28 + 4 * (4 * 8 + 16 + 2 * 4))
    assert sched.estimate_memory(split, 1) - sched.estimate_memory(text, 1) == (
        projector.stat().st_size + extra
    )
    # the runner's end: the message becomes the Source the runner loads (below, Child)
    assert json.loads(json.dumps(message))["projector"] == str(projector)


def test_a_changed_projector_needs_another_runner(src: Path) -> None:
    store = Store(src / "models")
    create(store, "m", parse("FROM ./text.gguf\nFROM ./mmproj.gguf"), base_dir=src)
    ref = store.resolve("m")
    facts = load_facts("m", store).gguf
    spec = sched.LoadSpec("m", ref, facts, 1, Options())

    class Proc:
        alive = True

    runner = sched.Runner(spec, Proc(), 1, 1, asyncio.Semaphore(1))  # type: ignore[arg-type]
    assert runner.usable_for(sched.LoadSpec("m", ref, facts, 1, Options()))
    # the same manifest digest with another projector file is another model
    other = dataclasses.replace(ref, projector=write_clip(src / "other.gguf", seed=1))
    assert not runner.usable_for(sched.LoadSpec("m", other, facts, 1, Options()))
    # and re-creating the model with another projector changes what the store resolves
    create(store, "m", parse("FROM ./text.gguf\nFROM ./other.gguf"), base_dir=src)
    changed = store.resolve("m")
    assert changed.projector not in (None, ref.projector)
    assert not runner.usable_for(sched.LoadSpec("m", changed, facts, 1, Options()))


# ---- loading --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_model(tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a tokenizer (one token per letter), so `Loaded` can load it."""
    g = open_gguf(tiny_llama_path)
    n = g.tensors["token_embd.weight"].shape[0]  # (n_vocab, n_embd)
    kv = {k: v for k, v in g.kv.items() if k != "general.architecture"}
    kv |= {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [f"t{i}" for i in range(n)]}
    tensors = []
    for info in g.tensors.values():
        assert info.type == GGMLQuantizationType.F32
        tensors.append((info.name, g.raw(info.name).view(np.float32).reshape(info.shape), None))
    return write_gguf(tmp_path_factory.mktemp("text") / "llama.gguf", "llama", kv, tensors)


def test_load_model_with_a_projector_needs_an_architecture_that_takes_one(
    tiny_llama_path: Path, tmp_path: Path
) -> None:
    g, clip = open_gguf(tiny_llama_path), open_gguf(write_clip(tmp_path / "mmproj.gguf"))
    backend = open_backend("numpy", g)
    projector = Projector(clip.config(), open_backend("numpy", clip))
    with pytest.raises(UnsupportedModelError, match="^llama models take no projector file$"):
        load_model(g.config(), backend, projector)
    load_model(g.config(), backend)  # without one it loads


class WithProjector:
    """Mixed into the tiny Llama: it takes images from a projector file, keeps the
    projector and "encodes" an image as the projector's `mm.input_projection.weight`."""

    image_token = 3
    image_text = ("", "")
    max_images = 0
    projector: Projector | None = None

    @classmethod
    def from_gguf_with_projector(cls, config: Any, backend: Any, projector: Projector) -> Any:
        model = cls.from_gguf(config, backend)
        model.projector = projector
        return model

    @property
    def vision(self) -> Any:
        return self.projector

    def preprocess(self, image: Any) -> Any:
        return image

    def image_tokens(self, pixels: Any) -> int:
        return 8

    def encode(self, ctx: Any, pixels: Any) -> Any:
        assert self.projector is not None
        return ctx.attach(self.projector.backend.weight("mm.input_projection.weight"))


@pytest.fixture
def takes_projector(monkeypatch: pytest.MonkeyPatch) -> type:
    import herd.models.llama  # noqa: F401  (registers llama)

    cls = type("LlamaWithProjector", (WithProjector, registry._REGISTRY["llama"]), {})
    monkeypatch.setitem(registry._REGISTRY, "llama", cls)
    assert isinstance(cls, TakesProjector)
    return cls


def test_loaded_hands_the_projector_to_the_model_and_encodes_on_its_backend(
    text_model: Path, tmp_path: Path, takes_projector: type
) -> None:
    clip_path = write_clip(tmp_path / "mmproj.gguf")
    loaded = Loaded(Source("m", text_model, projector=clip_path), "numpy", {"num_ctx": 64})
    model = loaded.model
    assert isinstance(model, takes_projector)
    assert model.projector.config.arch == "clip"
    assert model.projector.config.str("projector_type") == "gemma3"
    assert model.projector.backend is loaded.projector_backend
    assert loaded.projector_backend is not loaded.backend
    assert loaded.projector_backend.name == loaded.backend.name == "numpy"
    assert loaded.vision is model
    used: list[str] = []
    for name, backend in (("text", loaded.backend), ("projector", loaded.projector_backend)):
        make = backend.new_context
        backend.new_context = lambda make=make, name=name: used.append(name) or make()  # type: ignore[method-assign]
    runner = loaded.new_runner(Options(num_ctx=64))
    assert runner.encoder_backend is loaded.projector_backend
    used.clear()
    out = runner._encode(None)
    assert used == ["projector"]
    g = open_gguf(clip_path)
    info = g.tensors["mm.input_projection.weight"]
    expected = g.raw(info.name).view(np.float32).reshape(info.shape)
    np.testing.assert_array_equal(out, expected)
    closed: list[str] = []
    for name, backend in (("text", loaded.backend), ("projector", loaded.projector_backend)):
        close = backend.close
        backend.close = lambda close=close, name=name: closed.append(name) or close()  # type: ignore[method-assign]
    runner.release_graphs()
    loaded.close()
    assert sorted(closed) == ["projector", "text"]


def test_loading_rejects_a_projector_that_is_not_one(text_model: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.gguf"
    notes.write_text("hello, not a GGUF")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        Loaded(Source("m", text_model, projector=notes), "numpy")
    with pytest.raises(GGUFError, match="not a projector file: its general.architecture is "):
        Loaded(Source("m", text_model, projector=text_model), "numpy")
    with pytest.raises(UnsupportedModelError, match="llama models take no projector file"):
        Loaded(Source("m", text_model, projector=write_clip(tmp_path / "p.gguf")), "numpy")


def test_the_runner_process_loads_the_projector_of_its_load_message(
    text_model: Path, tmp_path: Path, takes_projector: type
) -> None:
    clip_path = write_clip(tmp_path / "mmproj.gguf")
    out = io.StringIO()
    child = Child(out)
    spec = {"name": "m", "path": str(text_model), "projector": str(clip_path),
            "backend": "numpy", "options": {"num_ctx": 64}, "parallel": 1}  # fmt: skip
    child.load(spec)
    assert json.loads(out.getvalue())["op"] == "ready"
    assert child.loaded is not None and child.loaded.source.projector == clip_path
    assert child.loaded.model.projector.backend is child.loaded.projector_backend
    assert child.engine is not None
    assert child.engine.runner.encoder_backend is child.loaded.projector_backend  # type: ignore[attr-defined]
    child.engine.runner.stop()  # type: ignore[attr-defined]
    child.loaded.close()
    # no projector in the message: none loaded
    plain = Child(io.StringIO())
    plain.load({**spec, "projector": None})
    assert plain.loaded is not None and plain.loaded.projector_backend is None
    plain.engine.runner.stop()  # type: ignore[union-attr]
    plain.loaded.close()


def test_the_library_passes_a_projector_for_paths_and_store_names(
    src: Path, text_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from herd import api

    clip_path = src / "mmproj.gguf"
    source = api.resolve(str(text_model), projector=str(clip_path))
    assert (source.path, source.projector) == (text_model, clip_path)
    assert api.resolve(str(text_model)).projector is None
    store = Store()  # HERD_MODELS: the test's own store
    create(store, "split", parse(f"FROM {text_model}\nFROM {clip_path}"), base_dir=src)
    ref = store.resolve("split")
    assert api.resolve("split").projector == ref.projector
    assert api.resolve("split", projector=src / "other.gguf").projector == src / "other.gguf"
    with pytest.raises(UnsupportedModelError, match="llama models take no projector file"):
        api.load("split", backend="numpy")


# ---- herd run --mmproj ----------------------------------------------------------------------
class Loader:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, model: Any, backend: Any, progress: Any, **kw: Any) -> Any:
        self.calls.append((model, backend, kw))
        return self

    def generate(self, prompt: str, **kw: Any) -> Any:
        return iter([{"response": "ok", "done": True}])

    def info(self) -> dict[str, Any]:
        return {"capabilities": ["completion", "vision"]}


def no_server(start: bool = False) -> None:
    raise AssertionError("--mmproj runs in this process: no server is asked")


def test_run_mmproj_passes_the_projector_to_the_loader(src: Path) -> None:
    loader = Loader()
    env = CliEnv(loader=loader, stdin_isatty=lambda: True, connect=no_server)
    r = CliRunner().invoke(
        cli, ["run", str(src / "text.gguf"), "--mmproj", str(src / "mmproj.gguf"), "hi"], obj=env
    )
    assert r.exit_code == 0, r.output
    assert loader.calls == [(src / "text.gguf", None, {"projector": src / "mmproj.gguf"})]
    # a store name with --mmproj also runs in-process, with that projector
    r = CliRunner().invoke(cli, ["run", "tiny", "--mmproj", "p.gguf", "hi"], obj=env)
    assert r.exit_code == 0, r.output
    assert loader.calls[-1] == ("tiny", None, {"projector": Path("p.gguf")})
    # without --mmproj the loader is called as before (no projector argument)
    r = CliRunner().invoke(cli, ["run", str(src / "text.gguf"), "hi"], obj=env)
    assert (r.exit_code, loader.calls[-1]) == (0, (src / "text.gguf", None, {}))
    assert "--mmproj" in CliRunner().invoke(cli, ["run", "--help"]).output


def test_api_create_with_a_model_and_a_projector_file(src: Path) -> None:
    """Ollama's CLI uploads both FROM files of a Modelfile and sends them in `files`."""
    from herd.server.store_api import recipe

    store = Store(src / "models")
    files = {}
    for name in ("text.gguf", "mmproj.gguf"):
        with store.blob_writer() as w:
            w.write((src / name).read_bytes())
            files[name] = w.commit().digest
    staging = src / "models" / ".staging"
    staging.mkdir()
    modelfile, _ = recipe(store, {"model": "m", "files": files}, staging)
    create(store, "m", modelfile, base_dir=staging / "empty")
    manifest, _ = store.read_manifest("m")
    assert [(x.media_type, x.digest) for x in manifest.layers] == [
        (MEDIA_MODEL, files["text.gguf"]),
        (MEDIA_PROJECTOR, files["mmproj.gguf"]),
    ]
    # two text models are still one too many
    files["mmproj.gguf"] = files["text.gguf"]
    (src / "models" / ".staging2").mkdir()
    with pytest.raises(BadRequestError, match="only one GGUF file per model"):
        recipe(store, {"model": "n", "files": files}, src / "models" / ".staging2")
