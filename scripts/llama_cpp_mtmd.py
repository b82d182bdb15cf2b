"""Run llama.cpp's multimodal path (libmtmd, through llama-cpp-python) on a text GGUF and a
projector GGUF: one prompt with one image, as `llama-mtmd-cli` would evaluate it.

Runs in a process of its own (tests/convert/test_gemma3_mmproj.py starts it), so that
llama.cpp's ggml libraries never share a process with herd's. Imports only llama_cpp and
NumPy. Writes an .npz with:

    tokens   (T,) the prompt as llama.cpp decodes it: text chunks' ids, and -1 for each
             position of the image chunk
    image    (N, D) the image chunk's embeddings (mtmd_encode_chunk, mtmd_get_output_embd)
    logits   (V,) the logits of the prompt's last token (mtmd_helper_eval_chunks)

    python scripts/llama_cpp_mtmd.py TEXT.gguf MMPROJ.gguf PROMPT IMAGE.npy OUT.npz

PROMPT holds llama.cpp's media marker (`<__media__>`) where the image goes; IMAGE.npy is
(H, W, 3) uint8 RGB.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np

N_THREADS = 2
N_CTX = 256


def run(text_path: str, proj_path: str, prompt: str, image: np.ndarray) -> dict[str, np.ndarray]:
    import llama_cpp
    from llama_cpp import mtmd_cpp as mtmd

    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(
        text_path.encode(), llama_cpp.llama_model_default_params()
    )
    if not model:
        raise SystemExit(f"llama.cpp could not load {text_path}")
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = N_CTX
    params.n_threads = params.n_threads_batch = N_THREADS
    ctx = llama_cpp.llama_init_from_model(model, params)
    mparams = mtmd.mtmd_context_params_default()
    mparams.use_gpu, mparams.n_threads, mparams.warmup = False, N_THREADS, False
    mctx = mtmd.mtmd_init_from_file(proj_path.encode(), model, mparams)
    if not mctx:
        raise SystemExit(f"libmtmd could not load {proj_path} with {text_path}")
    h, w, _ = image.shape
    pixels = np.ascontiguousarray(image, np.uint8)
    bitmap = mtmd.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * pixels.size).from_buffer(pixels))
    text = prompt.encode()
    inp = mtmd.mtmd_input_text(text, len(text), True, True)  # add_special, parse_special
    chunks = mtmd.mtmd_input_chunks_init()
    bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
    if mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(inp), bitmaps, 1) != 0:
        raise SystemExit("mtmd_tokenize failed")
    n_embd = llama_cpp.llama_model_n_embd(model)
    tokens: list[int] = []
    embd = None
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            count = ctypes.c_size_t()
            ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
            tokens += [ids[j] for j in range(count.value)]
            continue
        if mtmd.mtmd_encode_chunk(mctx, chunk) != 0:
            raise SystemExit("mtmd_encode_chunk failed")
        out = mtmd.mtmd_get_output_embd(mctx)
        embd = np.ctypeslib.as_array(out, shape=(n, n_embd)).copy()
        tokens += [-1] * n
    if embd is None:
        raise SystemExit(f"no image chunk in the prompt {prompt!r}")
    n_past = llama_cpp.llama_pos(0)
    if mtmd.mtmd_helper_eval_chunks(mctx, ctx, chunks, 0, 0, N_CTX, True, ctypes.byref(n_past)):
        raise SystemExit("mtmd_helper_eval_chunks failed")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
    result = {"tokens": np.array(tokens, np.int32), "image": embd, "logits": logits.copy()}
    mtmd.mtmd_input_chunks_free(chunks)
    mtmd.mtmd_bitmap_free(bitmap)
    mtmd.mtmd_free(mctx)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return result


if __name__ == "__main__":
    text_path, proj_path, prompt, image_path, out_path = sys.argv[1:6]
    np.savez(out_path, **run(text_path, proj_path, prompt, np.load(image_path)))
