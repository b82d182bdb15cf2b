"""Images: herd against its peers on a Gemma 3 vision model, same machine and threads.

    python -m benchmarks.vision [--threads 2] [--rounds 3] [--runs 1] [--engines ...]
                                [--vision-layers 27] [--workdir DIR] [--profile REPS]

The model is random-weight `Gemma3ForConditionalGeneration` built from its config (no
download) with the real Gemma 3 4B vision tower: SigLIP-400M (hidden 1152, MLP 4304, 27
layers, 16 heads, 896-pixel images in 14-pixel patches: 4096 patches, pooled to 256 soft
tokens). Its text part is small (2 layers, hidden 640, a 600-piece vocabulary plus the
image tokens): a random 4B text model would not change what is measured here (the
encoder) and does not fit the time of a small machine; the first-token figures are
therefore the encoder plus a small prefill. The directory is built once under --workdir
and converted with `herd convert` to F32 and to F16 (the converter's default: what users
get) for herd, and to llama.cpp's two files (text GGUF + mmproj) where the converter can
write them.

Figures, each engine in its own child process (compare.py's rules: rounds alternate the
engines' order, each round a fresh child, medians over rounds):
- encode ms: one image's encoder pass (herd: the runner's `_encode`, the vision encoder
  and projector in a context of their own; transformers fp32: `get_image_features`;
  llama.cpp: `mtmd_encode_chunk` on the image chunk of a raw 896x896 RGB bitmap), the
  median of --runs after a warm-up; the range is over every timed run of every round.
- first token ms: an image chat from PNG bytes to one generated token on a loaded model
  with nothing cached (herd: `LLM.chat(..., num_predict=1)` with the slot and the encoder
  cache emptied; transformers: the processor's inputs, then `generate(max_new_tokens=1)`;
  llama.cpp: `mtmd_tokenize` + `mtmd_helper_eval_chunks` + the last logits).
- herd's second turn: the conversation sent again with the same image and one more user
  message (encoder cache hit, the first turn's prefix reused), as its own line.

Ratios are of times (herd/peer < 1: herd is faster). Engines that cannot run are
skipped with the reason. The input is scikit-image's astronaut photograph as PNG.
`herd-ggml-f16-flash` (herd with HERD_FLASH_ATTENTION=1: the text model's attention fused
too; the encoder's always is, as llama.cpp's mtmd makes it) runs only when named in
--engines.
Every encoder layer costs the same: --vision-layers below 27 gives a quicker run whose
encode times scale by layers. `--profile REPS` instead times the parts of one encoder
layer at the real shape, herd's ggml against torch: where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import io
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PROMPT = "Describe this image."
FOLLOW_UP = "What colors stand out?"
# Gemma 3 4B's vision_config and projector (mm_tokens_per_image) as its config.json has them
VISION = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=896,
    patch_size=14,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
    vision_use_head=False,
)
TOKENS_PER_IMAGE = 256
# small on purpose (see the docstring); Gemma 3's head size and local/global layer mix
TEXT = dict(
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=512,
    layer_types=["sliding_attention", "full_attention"],
    max_position_embeddings=2048,
)
BOI, EOI, IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
NUM_CTX = 1024


def _timed(fn: Callable[[], Any]) -> float:
    """Milliseconds fn takes."""
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def photo_png() -> bytes:
    from PIL import Image
    from skimage import data

    out = io.BytesIO()
    Image.fromarray(data.astronaut()).save(out, format="PNG")
    return out.getvalue()


# ---- the model: built once, converted once ---------------------------------------------
def _write_tokenizer(dest: Path) -> dict[str, int]:
    """The test suite's small Gemma SentencePiece tokenizer, with Gemma 3's image tokens
    after its pieces as added special tokens (and named for transformers' processor)."""
    from tests.convert.tiny import write_tokenizer

    n = write_tokenizer("spm-gemma", dest)
    ids = {BOI: n, EOI: n + 1, IMAGE: n + 2}
    path = dest / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for text, i in ids.items():
        config["added_tokens_decoder"][str(i)] = {"content": text, "special": True}
    config["extra_special_tokens"] = {"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE}
    path.write_text(json.dumps(config, indent=1))
    return ids


def build(dest: Path, vision_layers: int) -> Path:
    """The Hugging Face directory of the random model (kept: built once per shape)."""
    if (dest / "config.json").is_file():
        return dest
    import torch
    import transformers

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ids = _write_tokenizer(tmp)
    torch.manual_seed(0)
    config = transformers.Gemma3Config(
        text_config=transformers.Gemma3TextConfig(vocab_size=ids[IMAGE] + 8, **TEXT),
        vision_config=transformers.SiglipVisionConfig(
            **{**VISION, "num_hidden_layers": vision_layers}
        ),
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=ids[BOI],
        eoi_token_index=ids[EOI],
        image_token_index=ids[IMAGE],
    )
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    model.save_pretrained(tmp)
    size = VISION["image_size"]
    transformers.Gemma3ImageProcessorPil(  # Gemma 3's: 896 pixels, mean = std = 0.5
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(tmp)
    tmp.rename(dest)
    return dest


def _herd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "herd", *args], capture_output=True, text=True, check=False
    )


def mmproj_supported() -> bool:
    """Whether this herd's converter writes llama.cpp's two files (`--mmproj`)."""
    return "--mmproj" in _herd("convert", "--help").stdout


def convert_all(src: Path) -> dict[str, str]:
    """The files each engine runs (kept: converted once): name -> path, or the reason
    it is missing under "mmproj_skipped"."""
    from herd.convert import convert

    files: dict[str, str] = {"hf": str(src)}
    for outtype in ("f32", "f16"):
        out = src.parent / f"{src.name}-{outtype}.gguf"
        if not out.exists():
            convert(src, out, outtype)
        files[outtype] = str(out)
    text, proj = src.parent / f"{src.name}-text.gguf", src.parent / f"{src.name}-mmproj.gguf"
    if not (text.exists() and proj.exists()):
        if not mmproj_supported():
            files["mmproj_skipped"] = "herd convert has no --mmproj (llama.cpp's two files) yet"
            return files
        done = _herd("convert", str(src), "-o", str(text), "--mmproj", str(proj), "-q")
        if done.returncode != 0:
            files["mmproj_skipped"] = (
                "herd convert --mmproj failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
            )
            return files
    files["text"], files["mmproj"] = str(text), str(proj)
    return files


# ---- engines: each returns a dict of measurements; run inside a child process ----------
def bench_herd(
    files: dict[str, str], outtype: str, threads: int, runs: int, flash: bool = False
) -> dict[str, Any]:
    """`flash`: HERD_FLASH_ATTENTION=1 (the text model's attention fused too; the vision
    encoder's is fused whatever it says)."""
    if flash:
        os.environ["HERD_FLASH_ATTENTION"] = "1"  # this child's only
    from herd.api import LLM
    from herd.models.imageproc import decode
    from herd.runner import Source
    from herd.runner.images import LRU, ImageCache

    png = photo_png()
    path = Path(files[outtype])
    opts = {"num_thread": threads, "num_gpu": 0, "num_ctx": NUM_CTX, "temperature": 0}
    t0 = time.perf_counter()
    llm = LLM(Source(path.name, path), backend="ggml", options=opts)
    runner = llm.runner(llm.defaults.merged({}))
    load_s = time.perf_counter() - t0
    vision = llm.loaded.vision
    assert vision is not None and runner.images is not None, "the file has no vision tower"
    pixels = vision.preprocess(decode(png))  # (3, 896, 896)

    runner._encode(pixels)  # warm-up
    encode = [_timed(lambda: runner._encode(pixels)) for _ in range(runs)]

    first = [{"role": "user", "content": PROMPT, "images": [png]}]
    chat_opts = {"num_predict": 1}
    llm.chat([{"role": "user", "content": PROMPT}], options=chat_opts)  # text graphs warm
    # the chats run on this runner (the same load-time options): its caches are emptied below
    assert llm.runner(llm.defaults.merged(chat_opts)) is runner
    first_ms, second_ms, encoder_runs = [], [], []
    prompt = evaluated = 0
    for _ in range(runs):
        runner.reset()  # no prefix cached, no image kept: a new conversation
        runner.images = ImageCache(runner._encode)  # nothing encoded
        llm.loaded.images = LRU(8)  # nothing decoded and preprocessed
        t = time.perf_counter()
        answer = llm.chat(first, options=chat_opts)
        first_ms.append((time.perf_counter() - t) * 1e3)
        prompt = answer["prompt_eval_count"]
        second = [
            *first,
            {"role": "assistant", "content": answer["message"]["content"]},
            {"role": "user", "content": FOLLOW_UP},
        ]
        t = time.perf_counter()
        again = llm.chat(second, options=chat_opts)
        second_ms.append((time.perf_counter() - t) * 1e3)
        evaluated = again["prompt_eval_count"]  # the tokens after the reused prefix
        encoder_runs.append(runner.images.encoded)
    llm.close()
    return {
        "encode_ms": encode,
        "first_ms": first_ms,
        "second_ms": second_ms,
        "encoder_runs": max(encoder_runs),  # per conversation of two turns: 1 when cached
        "second_evaluated": evaluated,
        "prompt_tokens": prompt,
        "load_s": load_s,
    }


def bench_transformers(files: dict[str, str], threads: int, runs: int) -> dict[str, Any]:
    """fp32 on the CPU."""
    import torch
    import transformers
    from PIL import Image

    torch.set_num_threads(threads)
    png = photo_png()
    src = files["hf"]
    t0 = time.perf_counter()
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        src, dtype=torch.float32
    ).eval()
    processor = transformers.Gemma3Processor(
        transformers.Gemma3ImageProcessorPil.from_pretrained(src),
        transformers.AutoTokenizer.from_pretrained(src),
        image_seq_length=TOKENS_PER_IMAGE,
    )
    load_s = time.perf_counter() - t0
    # Gemma 3's chat turn, the image where its template puts it (the processor expands
    # the start-of-image marker into the image's placeholders)
    text = f"<start_of_turn>user\n{BOI}{PROMPT}<end_of_turn>\n<start_of_turn>model\n"

    def inputs() -> Any:
        image = Image.open(io.BytesIO(png)).convert("RGB")
        return processor(text=text, images=[image], return_tensors="pt")

    pixels = inputs()["pixel_values"]
    with torch.inference_mode():
        model.get_image_features(pixels)  # warm-up
        encode = [_timed(lambda: model.get_image_features(pixels)) for _ in range(runs)]

        def first_token() -> None:
            model.generate(**inputs(), max_new_tokens=1, do_sample=False)

        warm = processor(text=text.replace(BOI, ""), return_tensors="pt")
        model.generate(**warm, max_new_tokens=1, do_sample=False)  # text path warm
        first_ms = [_timed(first_token) for _ in range(runs)]
    return {
        "encode_ms": encode,
        "first_ms": first_ms,
        "prompt_tokens": int(inputs()["input_ids"].shape[1]),
        "load_s": load_s,
    }


def bench_llama_cpp(files: dict[str, str], threads: int, runs: int) -> dict[str, Any]:
    """llama.cpp's mtmd on the two files (text GGUF + mmproj), through llama-cpp-python;
    its log lines (every call's) go to a file, read for what the warm-up decided."""
    if "mmproj_skipped" in files:
        return {"skipped": files["mmproj_skipped"]}
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    try:
        with _stderr_to(log):
            out = _llama_cpp(files, threads, runs)
        flash = "on" if "flash attention is enabled" in log.read_text() else "off"
        return {**out, "note": f"mtmd flash attention {flash}"}
    finally:
        log.unlink()


def _llama_cpp(files: dict[str, str], threads: int, runs: int) -> dict[str, Any]:
    import numpy as np
    from llama_cpp import Llama
    from llama_cpp import llama_cpp as C
    from llama_cpp import mtmd_cpp as M
    from PIL import Image
    from skimage import data

    png = photo_png()
    size = VISION["image_size"]
    rgb = np.asarray(Image.fromarray(data.astronaut()).resize((size, size), Image.BILINEAR))
    t0 = time.perf_counter()
    llm = Llama(files["text"], n_ctx=NUM_CTX, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)  # fmt: skip
    # mtmd's defaults otherwise, as its users run it (flash attention "auto": decided by
    # the warm-up, which logs it)
    params = M.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings = False, threads, False
    mctx = M.mtmd_init_from_file(files["mmproj"].encode(), llm._model.model, params)
    if not mctx:
        return {"skipped": "mtmd_init_from_file refused the projector file"}
    load_s = time.perf_counter() - t0
    lctx = llm._ctx.ctx
    marker = M.mtmd_default_marker().decode()
    prompt = f"<start_of_turn>user\n{marker}{PROMPT}<end_of_turn>\n<start_of_turn>model\n"
    keep: list[Any] = []  # ctypes buffers the bitmaps point into

    def tokenize(bitmap: Any) -> Any:
        raw = prompt.encode()
        text = M.mtmd_input_text(raw, len(raw), True, True)
        chunks = M.mtmd_input_chunks_init()
        bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
        if M.mtmd_tokenize(mctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
            raise RuntimeError("mtmd_tokenize failed")
        return chunks

    def image_chunk(chunks: Any) -> Any:
        for i in range(M.mtmd_input_chunks_size(chunks)):
            chunk = M.mtmd_input_chunks_get(chunks, i)
            if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                return chunk
        raise RuntimeError("no image chunk")

    buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(np.ascontiguousarray(rgb).tobytes())
    keep.append(buf)
    bitmap = M.mtmd_bitmap_init(size, size, buf)
    chunks = tokenize(bitmap)
    chunk = image_chunk(chunks)

    def encode_once() -> None:
        if M.mtmd_encode_chunk(mctx, chunk) != 0:
            raise RuntimeError("mtmd_encode_chunk failed")

    encode_once()  # warm-up
    encode = [_timed(encode_once) for _ in range(runs)]
    n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(llm._model.model))
    n_tokens = int(M.mtmd_helper_get_n_tokens(chunks))

    def first_token() -> None:
        C.llama_memory_clear(C.llama_get_memory(lctx), True)
        data_ = (ctypes.c_uint8 * len(png)).from_buffer_copy(png)
        bmp = M.mtmd_helper_bitmap_init_from_buf(mctx, data_, len(png), False)
        chunks = tokenize(bmp)
        n_past = C.llama_pos(0)
        if M.mtmd_helper_eval_chunks(mctx, lctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)):
            raise RuntimeError("mtmd_helper_eval_chunks failed")
        logits = np.ctypeslib.as_array(C.llama_get_logits_ith(lctx, -1), (n_vocab,))
        int(logits.argmax())
        M.mtmd_input_chunks_free(chunks)
        M.mtmd_bitmap_free(bmp)

    first_token()  # warm-up (text graphs)
    first_ms = [_timed(first_token) for _ in range(runs)]
    M.mtmd_input_chunks_free(chunks)
    M.mtmd_bitmap_free(bitmap)
    M.mtmd_free(mctx)
    llm.close()
    return {"encode_ms": encode, "first_ms": first_ms, "prompt_tokens": n_tokens,
            "load_s": load_s}  # fmt: skip


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """The C library's log lines (fd 2) into `path` meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---- --profile: where one encoder layer's time goes, herd's ggml against torch -----------
def profile(files: dict[str, str], threads: int, reps: int) -> str:
    """The parts of one encoder layer at the real shape (4096 patches x 1152), each timed in
    a pass of its own (herd: a context computing just that part, inputs uploaded; torch:
    the transformers model's own modules), the variants taking turns, median of `reps`
    after a warm-up."""
    import math

    import numpy as np
    import torch
    import transformers
    from PIL import Image

    from herd.gguf import open_gguf
    from herd.ml import BackendOptions, DType, open_backend
    from herd.models import load_model
    from herd.nn import attention

    torch.set_num_threads(threads)
    d, heads = VISION["hidden_size"], VISION["num_attention_heads"]
    hd, n = d // heads, (VISION["image_size"] // VISION["patch_size"]) ** 2
    herd: dict[str, Any] = {}
    for label, outtype, flash in (("f16", "f16", False), ("f32", "f32", False),
                                  ("f16 flash", "f16", True)):  # fmt: skip
        g = open_gguf(files[outtype])
        opts = BackendOptions(num_thread=threads, num_gpu=0, flash_attention=flash)
        backend = open_backend("ggml", g, opts)
        herd[label] = (backend, load_model(g.config(), backend))
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        files["hf"], dtype=torch.float32
    ).eval()
    tower = hf.model.vision_tower  # SiglipVisionModel: embeddings, encoder, post_layernorm
    layer = tower.encoder.layers[0]
    sdpa = hf.config.vision_config._attn_implementation
    rng = np.random.default_rng(0)
    model0 = herd["f16"][1]
    pixels = model0.preprocess(Image.open(io.BytesIO(photo_png())).convert("RGB"))[None]
    x = rng.standard_normal((n, d)).astype(np.float32)  # (P, D)
    qkv = [rng.standard_normal((n, heads, hd)).astype(np.float32) for _ in range(3)]
    tx, tp = torch.from_numpy(x)[None], torch.from_numpy(pixels)
    tq, tk, tv = (torch.from_numpy(a).permute(1, 0, 2)[None] for a in qkv)  # (1, H, P, hd)

    def ggml(label: str, fn: Callable[..., Any], *arrays: np.ndarray) -> Callable[[], Any]:
        backend, model = herd[label]
        blk = model.vision.blk[0]

        def run() -> None:
            with backend.new_context() as ctx:
                out = fn(model.vision, blk, *[ctx.input(a) for a in arrays])
                ctx.compute(*(out if isinstance(out, list) else [out]))

        return run

    def patches(v: Any, blk: Any, p: Any) -> Any:
        return v.patch_embedding.forward(p).add(v.position_embedding)

    def projections(v: Any, blk: Any, h: Any) -> Any:
        return [blk.attn_q.forward(h), blk.attn_k.forward(h), blk.attn_v.forward(h),
                blk.attn_output.forward(h)]  # fmt: skip

    def core(v: Any, blk: Any, q: Any, k: Any, vv: Any) -> Any:
        return attention(q, k, vv, 1.0 / math.sqrt(hd), None)

    def core_f16(v: Any, blk: Any, q: Any, k: Any, vv: Any) -> Any:
        return attention(q, k.cast(DType.F16), vv.cast(DType.F16), 1.0 / math.sqrt(hd), None)

    def core_blocks(v: Any, blk: Any, q: Any, k: Any, vv: Any) -> Any:
        out = None  # scores of 16 x 512 x 4096 (128 MiB) at a time instead of 1 GiB
        for i in range(0, n, 512):
            part = attention(q.slice(0, i, i + 512), k, vv, 1.0 / math.sqrt(hd), None)
            out = part if out is None else out.concat(part, 0)
        return out

    def mlp(v: Any, blk: Any, h: Any) -> Any:
        return blk.fc2.forward(blk.fc1.forward(h).gelu())

    def whole(v: Any, blk: Any, h: Any) -> Any:
        return blk.forward(h)

    a = layer.self_attn

    def eager() -> Any:
        probs = torch.softmax(tq @ tk.transpose(-1, -2) * hd**-0.5, -1)
        return probs @ tv

    parts: list[tuple[str, dict[str, Callable[[], Any]]]] = [
        ("patch embedding + positions", {
            **{k: ggml(k, patches, pixels) for k in ("f16", "f32")},
            "torch": lambda: tower.embeddings(tp)}),
        ("q, k, v, out projections", {
            **{k: ggml(k, projections, x) for k in ("f16", "f32")},
            "torch": lambda: [a.q_proj(tx), a.k_proj(tx), a.v_proj(tx), a.out_proj(tx)]}),
        ("attention QK^T, softmax, V (16 heads)", {
            "f16": ggml("f16", core, *qkv), "f16 flash": ggml("f16 flash", core, *qkv),
            "torch": lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv),
            "torch eager": eager}),
        # what would close the gap: the same attention, two ways herd does not take today
        ("  same, flash with K and V cast to F16", {
            "f16 flash": ggml("f16 flash", core_f16, *qkv)}),
        ("  same, composed in 512-query blocks", {
            "f16": ggml("f16", core_blocks, *qkv)}),
        ("MLP fc1, GELU (tanh), fc2", {
            **{k: ggml(k, mlp, x) for k in ("f16", "f32")},
            "torch": lambda: layer.mlp(tx)}),
        ("whole layer", {
            **{k: ggml(k, whole, x) for k in ("f16", "f32", "f16 flash")},
            "torch": lambda: layer(tx, None)}),
    ]  # fmt: skip
    times: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for rep in range(reps + 1):  # the first is the warm-up
            for name, variants in parts:
                order = list(variants.items())[:: 1 if rep % 2 == 0 else -1]
                for variant, fn in order:
                    t = _timed(fn)
                    if rep:
                        times.setdefault((name, variant), []).append(t)
    cols = ["f16", "f32", "f16 flash", "torch", "torch eager"]
    heads_ = ["herd f16", "herd f32", "herd f16 + flash attention", f"torch fp32 ({sdpa})",
              "torch eager"]  # fmt: skip
    lines = [
        f"one encoder layer's parts, ms (median of {reps}; {machine(threads)}); the "
        "attention rows: herd's ops composed, and fused (what its encoders run)",
        "",
        "| part | " + " | ".join(heads_) + " | herd f16 / torch |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for name, variants in parts:
        med = {v: statistics.median(times[(name, v)]) for v in variants}
        cells = [f"{med[c]:.0f}" if c in med else "" for c in cols]
        ratio = f"{med['f16'] / med['torch']:.2f}x" if {"f16", "torch"} <= med.keys() else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def _profile_child(files: dict[str, str], threads: int, reps: int, queue: Any) -> None:
    try:
        queue.put(profile(files, threads, reps))
    except Exception as e:
        queue.put(f"profile failed: {type(e).__name__}: {e}")


ENGINES: dict[str, Callable[[dict[str, str], int, int], dict[str, Any]]] = {
    "herd-ggml-f16": lambda f, t, r: bench_herd(f, "f16", t, r),
    "herd-ggml-f32": lambda f, t, r: bench_herd(f, "f32", t, r),
    "transformers": bench_transformers,
    "llama.cpp": bench_llama_cpp,
    # not run unless named in --engines: herd with a user's setting, not its default
    "herd-ggml-f16-flash": lambda f, t, r: bench_herd(f, "f16", t, r, flash=True),
}
DEFAULT_ENGINES = "herd-ggml-f16,herd-ggml-f32,transformers,llama.cpp"


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(name: str, files: dict[str, str], threads: int, runs: int, queue: Any) -> None:
    try:
        result = ENGINES[name](files, threads, runs)
        result["peak_rss_mb"] = _peak_rss_mb()
        queue.put(result)
    except ImportError as e:
        queue.put({"skipped": f"not installed ({e.name})"})
    except Exception as e:  # a failing engine must not hide the others' numbers
        queue.put({"skipped": f"{type(e).__name__}: {e}"})


def _threads_env(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)  # inherited by the child before numpy/torch load


def run_engine(name: str, files: dict[str, str], threads: int, runs: int) -> dict[str, Any]:
    _threads_env(threads)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, files, threads, runs, queue))
    proc.start()
    result = queue.get()  # before join: a large result would block the child's exit
    proc.join()
    return result


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure: the median over rounds of each round's median, and every timed run
    (for the range). Skipped if any round was."""
    for r in rounds:
        if "skipped" in r:
            return r
    out: dict[str, Any] = {}
    for key, value in rounds[0].items():
        if isinstance(value, list):
            out[key] = statistics.median(statistics.median(r[key]) for r in rounds)
            out[key + "_all"] = [x for r in rounds for x in r[key]]
        elif isinstance(value, str):
            out[key] = value
        else:
            out[key] = statistics.median(r[key] for r in rounds)
    return out


def machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {threads} threads, Python {platform.python_version()}"


def _ms(r: dict[str, Any], key: str) -> str:
    runs = r[key + "_all"]
    return f"{r[key]:.0f} ({min(runs):.0f}–{max(runs):.0f})"


def table(results: dict[str, dict[str, Any]], threads: int, vision_layers: int) -> str:
    ok = {n: r for n, r in results.items() if "skipped" not in r}
    peers = [p for p in ("transformers", "llama.cpp") if p in ok]
    layers = f"{vision_layers} layers" + (
        "" if vision_layers == VISION["num_hidden_layers"] else " of Gemma 3 4B's 27"
    )
    lines = [
        f"machine: {machine(threads)}",
        f"model: random Gemma3ForConditionalGeneration; vision tower Gemma 3 4B's SigLIP "
        f"(hidden 1152, MLP 4304, {layers}, 16 heads, 896 px / 14 px patches -> 4096 "
        f"patches -> {TOKENS_PER_IMAGE} tokens); text part small (2 layers, hidden 640: a "
        "random 4B text model does not fit a small machine's time, and the encoder is what "
        "is measured)",
        "times in ms: median over rounds (range over all runs); ratios are of times "
        "(< 1: herd faster)",
        "",
        "| engine | encode ms | first token ms | prompt tokens | load s | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | |")
            continue
        cells = []
        for key in ("encode_ms", "first_ms"):
            cell = _ms(r, key)
            if name.startswith("herd"):
                ratios = [f"{r[key] / ok[p][key]:.2f}x {p}" for p in peers]
                cell += " [" + ", ".join(ratios) + "]" if ratios else ""
            cells.append(cell)
        lines.append(
            f"| {name} | {cells[0]} | {cells[1]} | {r['prompt_tokens']:.0f} | "
            f"{r['load_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    notes = [f"{name}: {r['note']}" for name, r in ok.items() if "note" in r]
    if notes:
        lines.append("\n" + "; ".join(notes))
    for name, r in ok.items():
        if "second_ms" in r:
            lines.append(
                f"\n{name} second turn, same image resent (encoder cache hit, prefix "
                f"reused; encoder runs per two-turn conversation: {r['encoder_runs']:.0f}, "
                f"prompt tokens evaluated: {r['second_evaluated']:.0f}): "
                f"{_ms(r, 'second_ms')} ms"
            )
    return "\n".join(lines)


def paired(rounds: dict[str, list[dict[str, Any]]]) -> str:
    """Each herd engine's encode time over each peer's, round by round (drift on a shared
    machine cancels): median and range."""
    lines = []
    for peer in ("transformers", "llama.cpp"):
        theirs = rounds.get(peer, [])
        if len(theirs) < 2 or any("skipped" in r for r in theirs):
            continue
        for name, ours in rounds.items():
            if not name.startswith("herd") or any("skipped" in r for r in ours):
                continue
            ratios = sorted(
                statistics.median(h["encode_ms"]) / statistics.median(p["encode_ms"])
                for h, p in zip(ours, theirs, strict=False)
            )
            lines.append(
                f"{name}/{peer} encode per round ({len(ratios)} rounds): "
                f"{statistics.median(ratios):.3f}x ({ratios[0]:.2f}–{ratios[-1]:.2f})"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1, help="timed runs per round (median)")
    ap.add_argument("--rounds", type=int, default=3, help="turns each engine takes")
    ap.add_argument(
        "--engines", default=DEFAULT_ENGINES, help=f"of {', '.join(ENGINES)} (default: %(default)s)"
    )
    ap.add_argument(
        "--vision-layers",
        type=int,
        default=VISION["num_hidden_layers"],
        help="encoder layers (27: Gemma 3 4B's; fewer for a quick run: each layer costs the same)",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "herd-bench-vision",
        help="where the model and its conversions are kept between runs",
    )
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument(
        "--profile",
        type=int,
        metavar="REPS",
        default=0,
        help="instead: time one encoder layer's parts (herd's ggml against torch), REPS each",
    )
    args = ap.parse_args()
    names = args.engines.split(",")
    for name in names:
        if name not in ENGINES:
            ap.error(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
    shape = json.dumps([VISION, TEXT, TOKENS_PER_IMAGE, args.vision_layers], sort_keys=True)
    key = hashlib.sha256(shape.encode()).hexdigest()[:10]
    print("building and converting the model (once)...", file=sys.stderr, flush=True)
    src = build(args.workdir / f"gemma3-vision-L{args.vision_layers}-{key}", args.vision_layers)
    files = convert_all(src)
    if args.profile:
        _threads_env(args.threads)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_profile_child, args=(files, args.threads, args.profile, queue))
        proc.start()
        print(queue.get())
        proc.join()
        return
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for i in range(args.rounds):
        # odd rounds go in reverse: no engine always runs first (or right after another)
        for name, done in list(rounds.items())[:: 1 if i % 2 == 0 else -1]:
            if done and "skipped" in done[-1]:
                continue
            print(f"round {i + 1}: {name}...", file=sys.stderr, flush=True)
            done.append(run_engine(name, files, args.threads, args.runs))
    results = {name: combine(done) for name, done in rounds.items()}
    print(table(results, args.threads, args.vision_layers))
    if args.rounds > 1 and (pairs := paired(rounds)):
        print("\n" + pairs)
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "results": results}, indent=2))


if __name__ == "__main__":
    main()
