"""benchmarks/onnx.py and benchmarks/ortgenai_model.py's pure parts: the thread overlay
onnxruntime-genai is given, the table's ratios and skipped rows, the cache folder's name,
and that a failed build leaves nothing behind (the HF export is stubbed: it needs torch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import onnx as bench
from benchmarks import ortgenai_model

DIGEST = "cd" * 32


def test_overlay_sets_the_decoder_session_threads():
    opts = json.loads(bench.genai_overlay(3))["model"]["decoder"]["session_options"]
    assert opts == {"intra_op_num_threads": 3, "inter_op_num_threads": 1}


def test_table_gives_herd_over_the_peer_and_says_why_a_row_is_skipped():
    peer = {"prefill_tps": 400.0, "decode_tps": 50.0, "cold_s": 0.5, "peak_rss_mb": 300.0}
    ggml = {"prefill_tps": 800.0, "decode_tps": 25.0, "cold_s": 1.0, "peak_rss_mb": 150.0}
    results = {bench.PEER: peer, "herd-onnx": {"skipped": "not available"}, "herd-ggml": ggml}
    out = bench.table("m", results, 2).splitlines()
    assert out[0].startswith("model m, 2 threads")
    row = next(line for line in out if line.startswith("| herd-ggml"))
    assert "800.0 (2.00x onnxruntime-genai)" in row and "25.0 (0.50x" in row
    assert "1.00 (2.00x" in row and "150 (0.50x" in row
    assert "| herd-onnx | skipped: not available | | | |" in out
    peer_row = next(line for line in out if line.startswith(f"| {bench.PEER}"))
    assert "x " not in peer_row  # the peer is not compared with itself


def test_paired_ratios_are_per_round_and_skip_engines_that_did_not_run():
    peer = [{k: 1.0 for k, *_ in bench.COLS}, {k: 2.0 for k, *_ in bench.COLS}]
    herd = [{k: 3.0 for k, *_ in bench.COLS}, {k: 2.0 for k, *_ in bench.COLS}]
    lines = bench.paired({bench.PEER: peer, "herd-ggml": herd, "herd-onnx": [{"skipped": "x"}]})
    assert len(lines) == 1 and lines[0].startswith("herd-ggml/onnxruntime-genai")
    assert "decode tok/s 2.000x (1.00–3.00)" in lines[0]


def test_model_folder_is_named_by_digest_and_recipe(tmp_path: Path):
    blob = tmp_path / f"sha256-{DIGEST}"
    blob.write_bytes(b"not read")
    name = ortgenai_model.model_dir(blob, tmp_path).name
    assert name == f"cdcdcdcdcdcd-{ortgenai_model.RECIPE}"


def test_builder_command_is_int4_block_32_on_the_cpu(tmp_path: Path):
    cmd = ortgenai_model.build_command(tmp_path / "hf", tmp_path / "out", tmp_path / "c")
    assert cmd[:3] == [sys.executable, "-m", "onnxruntime_genai.models.builder"]
    assert cmd[cmd.index("-p") + 1] == "int4" and cmd[cmd.index("-e") + 1] == "cpu"
    assert "block_size=32" in cmd and "accuracy_level=4" in cmd


def test_a_failed_build_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    blob = tmp_path / f"sha256-{DIGEST}"
    blob.write_bytes(b"not read")
    root = tmp_path / "cache"

    def fake_hf(gguf: Path, work: Path) -> Path:
        (work / "hf").mkdir()
        return work / "hf"

    monkeypatch.setattr(ortgenai_model, "_hf_checkpoint", fake_hf)
    # a builder that fails: python -c exiting 1 with a message
    fail = [sys.executable, "-c", "import sys; sys.exit('no onnx_ir here')"]
    monkeypatch.setattr(ortgenai_model, "build_command", lambda *a: fail)
    with pytest.raises(RuntimeError, match="no onnx_ir here"):
        ortgenai_model.ensure(blob, root)
    assert list(root.iterdir()) == []


def test_cache_benchmark_fills_the_cache_then_alternates_in_flipping_pairs():
    from benchmarks import onnx_cache

    calls: list[str] = []
    times = onnx_cache.measure(3, lambda mode: calls.append(mode) or float(len(calls)))
    assert calls == ["cached", "cached", "uncached", "uncached", "cached", "cached", "uncached"]
    assert times == {"cached": [2.0, 5.0, 6.0], "uncached": [3.0, 4.0, 7.0]}
    out = onnx_cache.line("m", times)
    assert "5.00 s cached (runs 2.00-6.00)" in out and "4.00 s with HERD_ONNX_CACHE=0" in out
    assert out.endswith(": 0.80x")


def test_cache_benchmark_child_turns_the_cache_off_only_for_uncached(monkeypatch):
    from benchmarks import onnx_cache

    seen = []

    def fake_run(cmd, **kw):  # type: ignore[no-untyped-def]
        seen.append((kw["env"]["HERD_CACHE"], kw["env"]["HERD_ONNX_CACHE"], cmd[3:5]))
        assert cmd[5:] == ["1", "onnx"]  # one timed run, on the onnx backend
        return type("R", (), {"stdout": '{"cold_s": 0.5}\n', "returncode": 0})()

    monkeypatch.setattr(onnx_cache.revisions.subprocess, "run", fake_run)
    assert onnx_cache.cold_load("/m.gguf", 2, "/c", "uncached") == 0.5
    assert onnx_cache.cold_load("/m.gguf", 2, "/c", "cached") == 0.5
    assert seen == [("/c", "0", ["/m.gguf", "2"]), ("/c", "1", ["/m.gguf", "2"])]


def test_a_failed_child_is_one_clear_error_naming_the_file_and_why(tmp_path: Path):
    """A file that is not a GGUF: the measuring child fails, and the benchmarks say so in
    one line (the child's last), not with a CalledProcessError's traceback."""
    from benchmarks import onnx_cache, revisions

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF")
    with pytest.raises(revisions.ChildFailed, match=r"bad\.gguf.*not a GGUF file"):
        onnx_cache.cold_load(str(bad), 1, str(tmp_path / "cache"), "cached")
