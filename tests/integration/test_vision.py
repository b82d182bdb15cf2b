"""Images end to end, on a tiny random Gemma 3 vision model (built with transformers,
converted by herd): the request pipeline against transformers' own processor and model, the
encoder cache and prefix reuse across chat turns, batched conversations, and `herd serve`
driven by the official `ollama` and `openai` clients, bad images included.

The reference for the prompt is transformers' `Gemma3Processor`: its chat template puts
`<start_of_image>` where an image part is, and it expands that into the image's soft tokens.
herd instead tags images Ollama's way (`[img-N]` before the message's text) and puts the
model's image text there; the token ids must come out the same, and so must the pixels and
the logits of every prompt row.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
pytest.importorskip("skimage")
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

from convert.test_gemma3_vision import BOI, EOI, IMAGE, TOKENS, _build  # noqa: E402
from PIL import Image  # noqa: E402

from herd.api import LLM  # noqa: E402
from herd.convert import convert  # noqa: E402
from herd.options import Options  # noqa: E402
from herd.runner import Source  # noqa: E402
from herd.runner.pipeline import Request, prepare  # noqa: E402

TOL = 1e-4
TEMPLATE = (Path(__file__).parents[2] / "src/herd/template/builtin/gemma3.jinja").read_text()
GREEDY = {"temperature": 0, "num_predict": 4}


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    from skimage import data

    return {
        "cat": _png(data.chelsea()),  # 451 x 300
        "coffee": _png(data.coffee()),  # 600 x 400
        "astronaut": _png(data.astronaut()),  # 512 x 512
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Any, Path, Path]:
    """(transformers model, its folder with a processor, herd's F32 GGUF)."""
    tmp = tmp_path_factory.mktemp("vision")
    hf = tmp / "hf"
    model, _ = _build(hf)
    config = json.loads((hf / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE  # Gemma's format, image parts as <start_of_image>
    config["extra_special_tokens"] = {"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE}
    (hf / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return model, hf, convert(hf, tmp / "model.gguf", "f32")


def _llm(path: Path, backend: str = "numpy") -> LLM:
    return LLM(Source("tiny-vision", path), backend=backend, options={"num_ctx": 256})


def _hf_inputs(hf: Path, messages: list[dict[str, Any]], images: list[bytes]) -> dict[str, Any]:
    """transformers' processor on the same conversation, images as content parts."""
    processor = transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessorPil.from_pretrained(hf),
        tokenizer=transformers.AutoTokenizer.from_pretrained(hf),
        chat_template=TEMPLATE,
        image_seq_length=TOKENS,
    )
    parts = []
    for m in messages:
        content = [{"type": "image"} for _ in m.get("images", [])]
        content.append({"type": "text", "text": m["content"]})
        parts.append({"role": m["role"], "content": content})
    text = processor.apply_chat_template(parts, add_generation_prompt=True, tokenize=False)
    pil = [Image.open(io.BytesIO(b)) for b in images]
    # the template wrote <bos>: no second one (what apply_chat_template(tokenize=True) does)
    return processor(text=text, images=pil or None, return_tensors="pt", add_special_tokens=False)


def _hf_logits(model: Any, inputs: dict[str, Any]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(**inputs)
    return out.logits[0].float().numpy()


def _conversation(photos: dict[str, bytes]) -> list[dict[str, Any]]:
    """Two turns, an image in the earlier one and another image in the later one."""
    return [
        {"role": "user", "content": "What animal is this?", "images": [photos["cat"]]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And what is in this cup?", "images": [photos["coffee"]]},
    ]


@pytest.mark.parametrize("turns", [1, 3], ids=["one-image", "image-in-earlier-turn"])
def test_prompt_pixels_and_logits_equal_transformers(tiny, photos, turns) -> None:
    model, hf, path = tiny
    messages = _conversation(photos)[:turns]
    llm = _llm(path)
    prepared = prepare(llm.loaded, Request(messages=messages))
    sent = [img for m in messages for img in m.get("images", [])]
    ref = _hf_inputs(hf, messages, sent)
    assert prepared.tokens == ref["input_ids"][0].tolist()
    pixels = np.stack([image.pixels for _, image in prepared.images])
    assert np.abs(pixels - ref["pixel_values"].numpy()).max() < 1e-6
    assert [start for start, _ in prepared.images] == [
        i
        for i, t in enumerate(prepared.tokens)
        if t == llm.model.image_token and prepared.tokens[i - 1] != t
    ]
    ours = llm.runner(prepared.options).logits(prepared.tokens, images=prepared.images)
    theirs = _hf_logits(model, ref)
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < TOL


def test_resent_image_is_not_encoded_again_and_changed_one_is(tiny, photos) -> None:
    _, _, path = tiny
    llm = _llm(path)
    first = [{"role": "user", "content": "What animal is this?", "images": [photos["cat"]]}]
    answer = llm.chat(first, options=GREEDY)
    runner = llm._runner
    assert runner is not None and runner.images is not None
    assert runner.images.encoded == 1
    second = [
        *first,
        {"role": "assistant", "content": answer["message"]["content"]},
        {"role": "user", "content": "Is it sleeping?"},
    ]
    preprocessed = []
    original = llm.model.preprocess
    llm.model.preprocess = lambda image: preprocessed.append(image) or original(image)
    again = llm.chat(second, options=GREEDY)
    assert runner.images.encoded == 1  # the image came back: its encoding was kept
    assert preprocessed == []  # and so were its pixels
    whole = len(prepare(llm.loaded, Request(messages=second)).tokens)
    computed = again["prompt_eval_count"] - again["prompt_cached_count"]
    assert computed < whole - TOKENS  # the image's rows were reused too
    fresh = _llm(path).chat(second, options=GREEDY)  # everything computed anew
    assert again["message"]["content"] == fresh["message"]["content"]
    assert again["eval_count"] == fresh["eval_count"]
    # the same conversation with another photo in the first turn: encoded, and the cached
    # prefix ends where the image starts
    swapped = [{**second[0], "images": [photos["coffee"]]}, *second[1:]]
    other = llm.chat(swapped, options=GREEDY)
    assert runner.images.encoded == 2 and len(preprocessed) == 1
    prepared = prepare(llm.loaded, Request(messages=swapped))
    start = prepared.images[0][0]
    assert other["prompt_eval_count"] - other["prompt_cached_count"] == len(prepared.tokens) - start
    fresh = _llm(path).chat(swapped, options=GREEDY)
    assert other["message"]["content"] == fresh["message"]["content"]


def test_two_conversations_batched_equal_single_runs(tiny, photos) -> None:
    _, _, path = tiny
    llm = _llm(path)
    conversations = [
        [{"role": "user", "content": "Describe it.", "images": [photos["cat"]]}],
        [{"role": "user", "content": "What is this?", "images": [photos["coffee"]]}],
    ]
    opts = Options(num_ctx=256, temperature=0, num_predict=6)
    prepared = [prepare(llm.loaded, Request(messages=c)) for c in conversations]

    def tokens(runner: Any, p: Any) -> tuple[int, ...]:
        events = list(runner.generate(p.tokens, opts, images=p.images))
        return events[-1].tokens

    single = [tokens(llm.loaded.new_runner(opts), p) for p in prepared]
    runner = llm.loaded.new_runner(opts, parallel=2)
    runner.start()
    try:
        out: list[Any] = [None, None]
        threads = [
            threading.Thread(target=lambda i=i: out.__setitem__(i, tokens(runner, prepared[i])))
            for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        runner.stop()
    assert out == single


def test_text_turns_still_run_on_a_vision_model(tiny) -> None:
    _, _, path = tiny
    out = _llm(path).chat([{"role": "user", "content": "Hello"}], options=GREEDY)
    assert out["done"] and out["eval_count"] > 0


def test_images_in_generate_and_by_path(tiny, photos, tmp_path) -> None:
    _, _, path = tiny
    llm = _llm(path)
    photo = tmp_path / "cat.png"
    photo.write_bytes(photos["cat"])
    by_path = llm.generate("What animal is this?", images=[str(photo)], options=GREEDY)
    by_bytes = llm.generate("What animal is this?", images=[photos["cat"]], options=GREEDY)
    assert by_path["response"] == by_bytes["response"] and by_path["eval_count"] > 0
    chat = llm.chat(
        [{"role": "user", "content": "What animal is this?", "images": [photos["cat"]]}],
        options=GREEDY,
    )
    assert chat["message"]["content"] == by_bytes["response"]  # one user turn, same prompt


def test_ggml_matches_numpy_on_an_image_prompt(tiny, photos) -> None:
    pytest.importorskip("ggml")
    _, _, path = tiny
    messages = _conversation(photos)
    logits = []
    for backend in ("numpy", "ggml"):
        llm = _llm(path, backend)
        prepared = prepare(llm.loaded, Request(messages=messages))
        logits.append(llm.runner(prepared.options).logits(prepared.tokens, prepared.images))
    # ggml's default GELU reads an F16 table as llama.cpp's does: the text models' bound
    assert np.abs(logits[1] - logits[0]).max() / np.abs(logits[0]).max() < 3e-3


# ---- herd serve --------------------------------------------------------------------------
MAX_PIXELS = 250_000  # the astronaut (512 x 512) is over it; the cat and the coffee are not


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory) -> Iterator[str]:
    from herd.store import Store
    from herd.store.layout import MEDIA_MODEL, Layer

    _, _, path = tiny
    tmp = tmp_path_factory.mktemp("vision-server")
    store = Store(tmp / "models")
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    blob = store.blob_path(digest)
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, blob)
    store.write_model("tiny-vision", Layer(MEDIA_MODEL, digest, blob.stat().st_size))
    port = _free_port()
    env = {
        **os.environ,
        "HERD_MODELS": str(tmp / "models"),
        "HERD_HOST": f"127.0.0.1:{port}",
        "HERD_BACKEND": "numpy",
        "HERD_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
    }
    env.pop("HERD_API_KEY", None)
    log = tmp / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "herd", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
        assert proc.poll() is None, log.read_text()
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_server_image_chat_streams_with_both_clients(server, photos) -> None:
    client = ollama.Client(host=server)
    assert "vision" in client.show("tiny-vision").capabilities
    messages = [{"role": "user", "content": "What animal is this?", "images": [photos["cat"]]}]
    chunks = list(client.chat("tiny-vision", messages, options=GREEDY, stream=True))
    assert chunks[-1].done and chunks[-1].eval_count == GREEDY["num_predict"]
    text = "".join(c.message.content for c in chunks)
    whole = client.chat("tiny-vision", messages, options=GREEDY)
    assert whole.message.content == text
    generated = client.generate(
        "tiny-vision", "What animal is this?", images=[photos["cat"]], options=GREEDY
    )
    assert generated.response == text  # the same single user turn

    url = "data:image/png;base64," + base64.b64encode(photos["cat"]).decode()
    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    stream = oai.chat.completions.create(
        model="tiny-vision",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What animal is this?"},
                ],
            }
        ],
        temperature=0,
        max_tokens=GREEDY["num_predict"],
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == text


def _bad(photos: dict[str, bytes]) -> dict[str, tuple[bytes, str]]:
    png = photos["cat"]
    return {
        "not an image": (b"\x00\x01 definitely not an image" * 10, "cannot"),
        "truncated png": (png[: len(png) // 2], "truncated"),
        "over the pixel limit": (photos["astronaut"], "over the limit"),
    }


@pytest.mark.parametrize("case", ["not an image", "truncated png", "over the pixel limit"])
def test_server_bad_images_are_400_and_it_keeps_serving(server, photos, case) -> None:
    data, word = _bad(photos)[case]
    client = ollama.Client(host=server)
    messages = [{"role": "user", "content": "What is this?", "images": [data]}]
    with pytest.raises(ollama.ResponseError) as err:
        client.chat("tiny-vision", messages, options=GREEDY)
    assert err.value.status_code == 400 and word in str(err.value).lower()
    ok = client.chat(
        "tiny-vision",
        [{"role": "user", "content": "What is this?", "images": [photos["cat"]]}],
        options=GREEDY,
    )
    assert ok.done and ok.eval_count == GREEDY["num_predict"]


def test_server_refuses_image_urls_it_would_have_to_fetch(server, photos) -> None:
    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="base64"):
        oai.chat.completions.create(
            model="tiny-vision",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                        {"type": "text", "text": "What is this?"},
                    ],
                }
            ],
            max_tokens=2,
        )


# ---- mllama: one image per sequence ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_mllama(tmp_path_factory) -> Path:
    from convert.test_mllama import _build as build_mllama

    tmp = tmp_path_factory.mktemp("mllama")
    build_mllama(tmp / "hf")
    return convert(tmp / "hf", tmp / "model.gguf", "f32")


def test_mllama_keeps_the_conversations_latest_image(tiny_mllama, photos) -> None:
    from herd.errors import ImageError

    llm = LLM(Source("tiny-mllama", tiny_mllama), backend="numpy", options={"num_ctx": 256})
    image = llm.model.image_token
    conversation = [
        {"role": "user", "content": "What animal is this?", "images": [photos["cat"]]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And this?", "images": [photos["coffee"]]},
    ]
    prepared = prepare(llm.loaded, Request(messages=conversation))
    assert prepared.tokens.count(image) == 1  # the older image gave way to the newer
    ((start, kept),) = prepared.images
    latest = prepare(llm.loaded, Request(messages=conversation[2:])).images[0][1]
    assert kept.digest == latest.digest and start > len(prepared.tokens) // 2
    first = llm.chat(conversation, options=GREEDY)
    assert first["done"] and first["eval_count"] > 0
    with pytest.raises(ImageError, match="at most 1 image per message; 2 were sent"):
        llm.chat(
            [{"role": "user", "content": "Compare", "images": [photos["cat"], photos["coffee"]]}]
        )


def test_library_reads_the_image_limits_from_the_environment(tiny, photos, monkeypatch) -> None:
    from herd.errors import ImageError

    _, _, path = tiny
    monkeypatch.setenv("HERD_MAX_IMAGE_SIZE", "100KiB")  # the cat's PNG is ~220 KB
    llm = _llm(path)
    with pytest.raises(ImageError, match="over the limit of 102400 bytes"):
        llm.generate("What is this?", images=[photos["cat"]], options=GREEDY)
