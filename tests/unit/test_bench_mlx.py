"""benchmarks/mlx_model.py's cache: where a model goes, reuse, and that a failed or killed
build leaves nothing behind (the conversion itself is stubbed: it needs torch and mlx-lm)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import mlx_model

DIGEST = "ab" * 32


def test_folder_is_named_by_the_gguf_digest_and_the_recipe(tmp_path: Path) -> None:
    blob = tmp_path / f"sha256-{DIGEST}"  # a store blob: its name is its digest
    blob.write_bytes(b"not read")
    assert mlx_model.model_dir(blob, "float32", tmp_path).name == "abababababab-q4g32-float32"
    other = tmp_path / "model.gguf"  # any other file: hashed
    other.write_bytes(b"gguf bytes")
    want = hashlib.sha256(b"gguf bytes").hexdigest()[:12]
    assert mlx_model.model_dir(other, "float16", tmp_path).name == f"{want}-q4g32-float16"


def _fake_convert(fail: bool):
    def convert(gguf: Path, work: Path, out: Path, dtype: str) -> None:
        (work / "hf").mkdir()  # the intermediate checkpoint
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        if fail:
            raise RuntimeError("interrupted")
        (out / "config.json").write_text("{}")

    return convert


def test_build_renames_into_place_then_reuses(tmp_path: Path, monkeypatch) -> None:
    gguf = tmp_path / f"sha256-{DIGEST}"
    gguf.write_bytes(b"x")
    root = tmp_path / "cache"
    monkeypatch.setattr(mlx_model, "_convert", _fake_convert(fail=False))
    made = mlx_model.ensure(gguf, "float32", root)
    assert made == mlx_model.model_dir(gguf, "float32", root)
    assert sorted(p.name for p in made.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in root.iterdir()] == [made.name]  # no temporary folder left

    def no_convert(*_: object) -> None:
        raise AssertionError("a cached model was converted again")

    monkeypatch.setattr(mlx_model, "_convert", no_convert)
    assert mlx_model.ensure(gguf, "float32", root) == made


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    gguf = tmp_path / f"sha256-{DIGEST}"
    gguf.write_bytes(b"x")
    root = tmp_path / "cache"
    monkeypatch.setattr(mlx_model, "_convert", _fake_convert(fail=True))
    with pytest.raises(RuntimeError, match="interrupted"):
        mlx_model.ensure(gguf, "float32", root)
    assert list(root.iterdir()) == []


def test_killed_builds_leftovers_are_pruned_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / f".tmp-{int(dead.stdout)}-abc"  # its process has exited
    live = tmp_path / f".tmp-{os.getpid()}-def"
    model = tmp_path / "abababababab-q4g32-float32"
    for d in (stale, live, model):
        d.mkdir()
    assert mlx_model.prune_stale(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, model.name])


def test_unknown_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="float64"):
        mlx_model.ensure(tmp_path / "m.gguf", "float64", tmp_path)


def test_rope_parameters_spelled_as_mlx_lm_reads_them() -> None:
    # transformers 5's SmolLM2 config: theta only in rope_parameters (mlx-lm's default 10000)
    llama = {"model_type": "llama", "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}
    out = mlx_model.legacy_rope_fields(llama)
    assert out["rope_theta"] == 1e5 and "rope_scaling" not in out
    scaled = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}
    assert mlx_model.legacy_rope_fields(scaled)["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
    }
    types = (["sliding_attention"] * 5 + ["full_attention"]) * 3
    gemma = {
        "model_type": "gemma3_text",
        "layer_types": types,
        "rope_parameters": {
            "full_attention": {"rope_theta": 1e6, "rope_type": "default"},
            "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
        },
    }
    out = mlx_model.legacy_rope_fields(gemma)
    assert (out["rope_theta"], out["rope_local_base_freq"]) == (1e6, 1e4)
    assert out["sliding_window_pattern"] == 6
    assert mlx_model.legacy_rope_fields({**llama, "rope_theta": 7.0})["rope_theta"] == 7.0


def test_gemma_layer_types_mlx_lm_cannot_express_are_refused() -> None:
    types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="pattern"):
        mlx_model.legacy_rope_fields(
            {"model_type": "gemma3_text", "layer_types": types, "rope_parameters": {}}
        )
