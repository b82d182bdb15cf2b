"""Real built-in models against references nobody here wrote.

Teacher-forced logits against llama.cpp goldens (tests/testdata/logits_*.<kernels>.json, made by
scripts/make_goldens.py with llama-cpp-python), and against transformers loading the same
GGUF (it dequantizes to fp32, as herd's NumPy backend does).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

import herd
from herd.ml import available_backends

DATA = Path(__file__).parent.parent / "testdata"

# (top-1 agreement at least, mean |Δ log p| of llama.cpp's top token at most), per backend.
# llama.cpp quantizes activations to 8 bits in its matmuls, so fp32 NumPy cannot match
# exactly; ggml runs the same kernels and must be much closer.
# ONNX Runtime keeps Q4_0/Q4_1/Q8_0/Q4_K/Q5_0/Q5_1/Q5_K/Q6_K blocks exactly (MatMulNBits), but
# its int8 activations round otherwise than llama.cpp's q8 dot products (README), so NumPy's
# figures are its bound too.
THRESHOLDS = {
    "numpy": (0.9, 0.08),
    "ggml": (0.96, 0.02),
    "mlx": (0.96, 0.03),
    "onnx": (0.9, 0.08),
}
# MLX keeps the GGUF's blocks exactly (herd.ml.backends.mlx.quant) and computes in fp32 as
# NumPy does, so NumPy's figures on the same goldens are its floor (issue 16): its bound is
# 0.03 or, where NumPy itself is further from llama.cpp, NumPy's own figure (measured: SmolLM2
# 0.034 / 0.036, Gemma 3 0.053 / 0.049 on the AVX-512 / AVX2 goldens, which differ from each
# other by 0.027 / 0.035 where their top tokens agree). MLX must sit on that floor.
FLOOR_SLACK = 1e-3


def bounds(backend: str, model: str, path) -> tuple[float, float]:
    """(min top-1, max mean |Δ log p|) for `backend` on `model`'s logits goldens."""
    min_top1, max_dlogp = THRESHOLDS[backend]
    if backend == "mlx":
        max_dlogp = max(max_dlogp, _numpy_dlogp(str(path), model) + FLOOR_SLACK)
    return min_top1, max_dlogp


@functools.cache
def _numpy_dlogp(path: str, model: str) -> float:
    """NumPy's mean |Δ log p| on the goldens' cases with positions, as the tests take it."""
    llm = herd.load(path, backend="numpy")
    cases = [c for c in load_golden("logits", model, "numpy")["cases"] if "positions" in c]
    return float(np.mean([agreement(llm, c)[1] for c in cases]))


def _backend_version(backend: str) -> str:
    if backend != "ggml":
        return backend
    from herd.ml.backends.ggml import _lib

    # the Makefile builds ggml-python with llama.cpp's ggml (scripts/build_ggml.py); the
    # older ggml a plain `pip install ggml-python` brings rounds K-quants differently
    return f"ggml {_lib.ggml_version().decode()}"


def kernels() -> str | None:
    """The vector extensions ggml's CPU kernels were built for (None without ggml-python).
    llama.cpp's logits differ in the last digits between kernel sets (SmolLM2's mean
    |Δ log p| 0.03 from AVX-512 to AVX2), so the goldens are per set, each made on such a
    machine by scripts/make_goldens.py (which names them the same way)."""
    try:
        import ggml
    except ImportError:
        return None
    for name in ("avx512", "avx2", "neon"):
        if getattr(ggml, f"ggml_cpu_has_{name}")():
            return name
    return "generic"


def load_golden(kind: str, model: str, backend: str) -> dict:
    """The goldens of this machine's kernels. ggml must run the kernels llama.cpp ran, so
    without goldens of its kernel set its tests cannot say anything; NumPy computes in fp32
    whatever the CPU, and its looser bounds hold against any set."""
    ours = DATA / f"{kind}_{model}.{kernels()}.json"
    if ours.exists():
        return json.loads(ours.read_text())
    if backend == "ggml":
        pytest.skip(
            f"no llama.cpp goldens for this CPU's kernels ({kernels()}); make them with "
            "scripts/make_goldens.py on this machine"
        )
    return json.loads(sorted(DATA.glob(f"{kind}_{model}.*.json"))[0].read_text())


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def agreement(llm, case) -> tuple[float, float]:
    lsm = log_softmax(llm.logits(case["ids"]))
    top = np.array([p["top1"] for p in case["positions"]])
    ref = np.array([p["logp"] for p in case["positions"]])
    rows = np.arange(len(top))
    return float((lsm[rows].argmax(-1) == top).mean()), float(np.abs(lsm[rows, top] - ref).mean())


@pytest.fixture(scope="module", params=[b for b in available_backends() if b in THRESHOLDS])
def smollm2(request, smollm2_path):
    return herd.load(smollm2_path, backend=request.param)


def test_smollm2_teacher_forced_logits_match_llama_cpp(smollm2, smollm2_path):
    golden = load_golden("logits", "smollm2", smollm2.backend.name)
    results = {c["label"]: agreement(smollm2, c) for c in golden["cases"]}
    top1 = np.mean([r[0] for r in results.values()])
    dlogp = np.mean([r[1] for r in results.values()])
    min_top1, max_dlogp = bounds(smollm2.backend.name, "smollm2", smollm2_path)
    version = _backend_version(smollm2.backend.name)
    assert top1 >= min_top1 and dlogp <= max_dlogp, (version, results)


def test_smollm2_logits_match_transformers_on_the_same_gguf(smollm2_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    )
    llm = herd.load(smollm2_path, backend="numpy")
    ids = llm.tokenize("The quick brown fox jumps over the lazy dog. " * 3)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
    ours = llm.logits(ids)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-3


def test_smollm2_greedy_generation_matches_llama_cpp_on_ggml(smollm2_path):
    """Same kernels as llama.cpp: 24 greedy tokens agree for at least the first 12."""
    if "ggml" not in available_backends():
        pytest.skip("ggml-python not installed (pip install -e '.[ggml]')")
    llm = herd.load(smollm2_path, backend="ggml")
    golden = load_golden("greedy", "smollm2", "ggml")
    for case in golden["cases"]:
        out = llm.generate(case["prompt"], raw=True, options={"temperature": 0, "num_predict": 24})
        ours = out["context"][len(case["prompt_ids"]) :]
        assert ours[:12] == case["generated"][:12], case["prompt"]


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_mlx_greedy_generation_is_numpys_against_llama_cpp(name, request, record_property):
    """24 greedy tokens on MLX: the fp32 floor's tokens (NumPy's) exactly, and their common
    prefix with llama.cpp's reported (AVX2 goldens, per prompt: SmolLM2 5, 13, 24; Gemma 3
    15, 24, 4: where llama.cpp's 8-bit activations tip a near tie, fp32 goes another way)."""
    if "mlx" not in available_backends():
        pytest.skip("mlx not installed (pip install -e '.[mlx]')")
    path = request.getfixturevalue(f"{name}_path")
    golden = load_golden("greedy", name, "mlx")
    options = {"temperature": 0, "num_predict": 24}
    runs = {b: herd.load(path, backend=b) for b in ("mlx", "numpy")}
    prefixes = []
    for case in golden["cases"]:
        n = len(case["prompt_ids"])
        mlx, ref = (runs[b].generate(case["prompt"], raw=True, options=options) for b in runs)
        ours = mlx["context"][n:]
        assert ours == ref["context"][n:], case["prompt"]
        same = [a == b for a, b in zip(ours, case["generated"], strict=False)] + [False]
        prefixes.append(same.index(False))
    record_property("common_prefix_with_llama_cpp", prefixes)
    assert len(prefixes) == len(golden["cases"]) and max(prefixes) > 0, prefixes


@pytest.mark.parametrize("backend", [b for b in available_backends() if b in THRESHOLDS])
def test_gemma3_logits_match_llama_cpp(gemma3_path, backend):
    golden = load_golden("logits", "gemma3", backend)
    cases = [c for c in golden["cases"] if "positions" in c]
    llm = herd.load(gemma3_path, backend=backend)
    results = [agreement(llm, c) for c in cases]
    min_top1, max_dlogp = bounds(backend, "gemma3", gemma3_path)
    top1 = np.mean([r[0] for r in results])
    dlogp = np.mean([r[1] for r in results])
    assert top1 >= min_top1 and dlogp <= max_dlogp, (_backend_version(backend), results)


@pytest.mark.parametrize("backend", [b for b in available_backends() if b in THRESHOLDS])
def test_gemma3_past_the_sliding_window_matches_llama_cpp(gemma3_path, backend):
    """A 657-token prompt: positions past the 512-token window agree with llama.cpp."""
    golden = load_golden("logits", "gemma3", backend)
    case = next(c for c in golden["cases"] if c["label"] == "long")
    top = np.array([p[0] for p in case["top1_logp"]])
    ref = np.array([p[1] for p in case["top1_logp"]])
    lsm = log_softmax(herd.load(gemma3_path, backend=backend).logits(case["ids"]))
    rows = np.arange(512, len(top))
    agree = (lsm[rows].argmax(-1) == top[rows]).mean()
    dlogp = np.abs(lsm[rows, top[rows]] - ref[rows]).mean()
    min_top1, max_dlogp = THRESHOLDS[backend]
    assert agree >= min_top1 and dlogp <= max_dlogp, (_backend_version(backend), agree, dlogp)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_ggml_runs_llama_cpps_own_kernels(name, request):
    """herd's ggml is built from llama.cpp's ggml with its flags (scripts/build_ggml.py) and
    repacks weights as llama.cpp does: teacher-forced logits then agree to the goldens'
    rounding (5 digits), far inside the issue's bounds; a drift in graph or kernels shows."""
    if "ggml" not in available_backends():
        pytest.skip("ggml-python not installed (pip install -e '.[ggml]')")
    path = request.getfixturevalue(f"{name}_path")
    golden = load_golden("logits", name, "ggml")
    llm = herd.load(path, backend="ggml", options={"num_thread": golden["run"]["n_threads"]})
    results = [agreement(llm, c) for c in golden["cases"] if "positions" in c]
    assert all(r[0] == 1.0 and r[1] < 1e-4 for r in results), (_backend_version("ggml"), results)


@pytest.mark.parametrize("flash", [False, True], ids=["composed", "flash"])
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_decoding_sequences_attended_together_keep_their_logits(name, flash, request):
    """ggml attends a run of decoding sequences in one op (`CacheConfig.streams`): on the
    real models (Gemma 3: two caches, one with a 512-token sliding window, and prompts
    that reach past it), every decode step's logits equal those of one attention per
    sequence. With flash attention the prompts stay under 512 tokens: past that, ggml's
    CPU kernel splits one sequence's single query row over the threads and sums their
    parts in F32, while several sequences' rows go whole to a thread each, and its F16
    accumulation then rounds differently (as in llama.cpp's own streams). Gemma 3's
    logits move by up to 16-21 either way against the composed kernel's, which is why
    flash attention is opt-in on a CPU."""
    if "ggml" not in available_backends():
        pytest.skip("ggml-python not installed (pip install -e '.[ggml]')")
    import herd.kvcache.causal as causal
    from herd.runner.loaded import Loaded, Source

    path = request.getfixturevalue(f"{name}_path")
    lengths = (300, 40, 200) if flash else (530, 40, 300)
    text = "The sky was clear, and the old astronomer counted the moons of Jupiter. " * 60
    steps: dict[bool, list[np.ndarray]] = {}
    for streams in (True, False):
        loaded = Loaded(Source(name, path), "ggml", {"num_ctx": 1024}, flash_attention=flash)
        prompts = [loaded.tokenizer.encode(f"Story {i}: {text}")[:n] for i, n in enumerate(lengths)]
        runner = loaded.new_runner(loaded.defaults, parallel=3)
        seen: list[np.ndarray] = []
        compute = runner._compute

        def recording(batch, compute=compute, seen=seen):
            out = compute(batch)
            if len(batch.tokens) == 3:  # the three sequences' decode steps
                seen.append(np.array(out, copy=True))
            return out

        runner._compute = recording  # type: ignore[method-assign]
        streamed: list[tuple[int, ...]] = []
        plan = causal.Causal._streams

        def streams_of(self, batch, cuts, plan=plan, streamed=streamed, on=streams):
            runs = plan(self, batch, cuts) if on else []
            streamed.extend(runs)
            return runs

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(causal.Causal, "_streams", streams_of)
            options = loaded.defaults.merged({"temperature": 0, "num_predict": 16})
            gens = [runner.generate(p, options) for p in prompts]
            for g in gens:  # each admitted and computed before the next joins
                next(g)
            for _ in range(6):  # decode steps, until one of them ends its answer
                if any(next(g, None) is None for g in gens):
                    break
        steps[streams] = seen
        assert bool(streamed) is streams  # the three sequences as one block, or none
        loaded.close()
    assert len(steps[True]) == len(steps[False]) >= 3
    together, apart = np.concatenate(steps[True]), np.concatenate(steps[False])
    np.testing.assert_allclose(together, apart, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif("onnx" not in available_backends(), reason="onnxruntime is not installed")
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_onnx_decoding_token_by_token_matches_llama_cpp(name, request):
    """The goldens' cases fed a token a pass, every pass a decode step: each row's attention
    runs in place in the KV cache (GroupQueryAttention, onnx/fused.py), and the logits
    agree with llama.cpp as the teacher-forced pass's do (measured: SmolLM2 top-1 0.973,
    mean |Δ log p| 0.042; Gemma 3 0.950, 0.064 with its Q5_0 and Q6_K layers in MatMulNBits,
    0.959, 0.055 with them dequantized; the F16 cache composed: 0.965, 0.047 and 0.959,
    0.056)."""
    from herd.gguf import open_gguf
    from herd.ml import open_backend
    from herd.models import Batch, load_model
    from herd.options import Options
    from herd.runner import Runner

    path = request.getfixturevalue(f"{name}_path")
    g = open_gguf(path)
    backend = open_backend("onnx", g)
    model = load_model(g.config(), backend)
    runner = Runner(model, backend, _Letters(), Options(num_ctx=1024), model.context_length)
    results = []
    for case in [c for c in load_golden("logits", name, "onnx")["cases"] if "positions" in c]:
        runner.reset()
        rows = [runner._compute(Batch.single([t], i))[0].copy() for i, t in enumerate(case["ids"])]
        lsm = log_softmax(np.array(rows))
        top = np.array([p["top1"] for p in case["positions"]])
        ref = np.array([p["logp"] for p in case["positions"]])
        at = np.arange(len(top))
        results.append(((lsm[at].argmax(-1) == top).mean(), np.abs(lsm[at, top] - ref).mean()))
    assert runner.graphs.kept["decode"][1].plan.in_place, "the decode step did not attend in place"
    min_top1, max_dlogp = bounds("onnx", name, path)
    top1, dlogp = np.mean([r[0] for r in results]), np.mean([r[1] for r in results])
    assert top1 >= min_top1 and dlogp <= max_dlogp, results


class _Letters:
    def piece(self, id: int, special: bool = False) -> bytes:
        return bytes([97 + id % 26])

    def is_eog(self, id: int) -> bool:
        return False
