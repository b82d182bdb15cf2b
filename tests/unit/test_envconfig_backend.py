"""The backends' settings read from the environment by herd.envconfig (HERD_ONNX_*,
HERD_CACHE, HERD_RPC, HERD_SCHED_SPREAD), and handed to the backend as BackendOptions
fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from herd import envconfig
from herd.errors import BackendError
from herd.ml import BackendOptions

NAMES = (
    "HERD_ONNX_PROVIDERS",
    "HERD_ONNX_DEQUANTIZE",
    "HERD_ONNX_CACHE",
    "HERD_ONNX_KV_IN_PLACE",
    "HERD_CACHE",
    "HERD_RPC",
    "HERD_SCHED_SPREAD",
    "OLLAMA_SCHED_SPREAD",
)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """None of the variables set, and a home of this test's own."""
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


def test_unset_means_the_defaults(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert envconfig.onnx_providers() == ()  # the best installed
    assert envconfig.onnx_dequantize() is False
    assert envconfig.onnx_cache() is True
    assert envconfig.onnx_kv_in_place() is True
    assert envconfig.onnx_cache_dir() == tmp_path / ".cache" / "herd" / "onnx"
    assert envconfig.rpc_servers() == () and envconfig.sched_spread() is False
    opts = BackendOptions(**envconfig.backend_options())
    defaults = BackendOptions()
    assert (opts.onnx_providers, opts.onnx_dequantize, opts.onnx_cache, opts.onnx_kv_in_place) == (
        defaults.onnx_providers,
        defaults.onnx_dequantize,
        defaults.onnx_cache,
        defaults.onnx_kv_in_place,
    )


def test_set_values_are_read(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("HERD_ONNX_PROVIDERS", " cuda, CPUExecutionProvider ,,")
    env.setenv("HERD_ONNX_DEQUANTIZE", "1")
    env.setenv("HERD_ONNX_CACHE", "0")
    env.setenv("HERD_ONNX_KV_IN_PLACE", "0")
    env.setenv("HERD_CACHE", str(tmp_path / "c"))
    env.setenv("HERD_RPC", " 10.0.0.2:50052,, host-b:50053 ")
    env.setenv("OLLAMA_SCHED_SPREAD", "1")
    assert envconfig.backend_options() == {
        "onnx_providers": ("cuda", "CPUExecutionProvider"),
        "onnx_dequantize": True,
        "onnx_cache": False,
        "onnx_cache_dir": tmp_path / "c" / "onnx",
        "onnx_kv_in_place": False,
        "rpc_servers": ("10.0.0.2:50052", "host-b:50053"),
        "sched_spread": True,
    }
    BackendOptions(**envconfig.backend_options())  # every key is a field


@pytest.mark.parametrize(
    ("herd", "ollama", "want"),
    [("", "", False), ("", "true", True), ("0", "1", False), ("yes", "", True)],
)
def test_sched_spread_is_herds_else_ollamas(
    env: pytest.MonkeyPatch, herd: str, ollama: str, want: bool
) -> None:
    env.setenv("HERD_SCHED_SPREAD", herd)
    env.setenv("OLLAMA_SCHED_SPREAD", ollama)
    assert envconfig.sched_spread() is want


@pytest.mark.parametrize(("value", "want"), [("0", False), ("", False), ("1", True), ("yes", True)])
def test_dequantize_is_anything_but_0(env: pytest.MonkeyPatch, value: str, want: bool) -> None:
    env.setenv("HERD_ONNX_DEQUANTIZE", value)
    assert envconfig.onnx_dequantize() is want


@pytest.mark.parametrize(("value", "want"), [("0", False), ("", True), ("1", True)])
def test_only_0_turns_the_disk_cache_off(env: pytest.MonkeyPatch, value: str, want: bool) -> None:
    env.setenv("HERD_ONNX_CACHE", value)
    assert envconfig.onnx_cache() is want


@pytest.mark.parametrize(("value", "want"), [("0", False), ("", True), ("1", True)])
def test_only_0_turns_the_in_place_cache_off(
    env: pytest.MonkeyPatch, value: str, want: bool
) -> None:
    env.setenv("HERD_ONNX_KV_IN_PLACE", value)
    assert envconfig.onnx_kv_in_place() is want


def test_the_backend_resolves_and_refuses_providers(env: pytest.MonkeyPatch) -> None:
    """Short names resolve; one not installed is the backend's error, naming those that are."""
    pytest.importorskip("onnxruntime")
    from herd.ml.backends.onnx.backend import providers

    env.setenv("HERD_ONNX_PROVIDERS", "cpu")
    assert providers(envconfig.onnx_providers()) == ["CPUExecutionProvider"]
    env.setenv("HERD_ONNX_PROVIDERS", "nosuch,cpu")
    with pytest.raises(BackendError, match="'nosuch' is not installed; available: .*CPUExecution"):
        providers(envconfig.onnx_providers())


def test_the_disk_cache_folder_follows_the_options(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from herd.ml.backends.onnx import disk

    assert disk.cache_root(BackendOptions(onnx_cache=False)) is None
    assert disk.cache_root(BackendOptions(onnx_cache_dir=tmp_path)) == tmp_path
    assert disk.cache_root(BackendOptions()) == Path.home() / ".cache" / "herd" / "onnx"


def test_herd_show_backend_line_follows_the_providers(env: pytest.MonkeyPatch) -> None:
    """`herd show`'s backend line opens no model, yet reads HERD_ONNX_PROVIDERS as a load
    would: an uninstalled provider is named there, the default is the CPU here."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from herd.cli.show import _backend

    env.setenv("HERD_BACKEND", "onnx")
    assert _backend().startswith("onnx (")
    env.setenv("HERD_ONNX_PROVIDERS", "nosuch")
    line = _backend()
    assert line.startswith("none (") and "nosuch" in line, line


def test_herd_variables_are_herds_and_ollamas_only(env: pytest.MonkeyPatch) -> None:
    env.setenv("HERD_NUM_PARALLEL", "3")
    env.setenv("OLLAMA_KEEP_ALIVE", "10m")
    env.setenv("HERDING_CATS", "no")
    got = envconfig.herd_variables()
    assert got["HERD_NUM_PARALLEL"] == "3" and got["OLLAMA_KEEP_ALIVE"] == "10m"
    assert "HERDING_CATS" not in got and all(k.startswith(("HERD_", "OLLAMA_")) for k in got)
