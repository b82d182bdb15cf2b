"""Images through every interface, down to what the runner is sent: Ollama's `images`
(base64) on /api/generate and /api/chat messages, OpenAI's `image_url` content parts, the
CLI's image paths in a prompt (one-shot and REPL), `show`'s vision capability and
projector, and the library's paths or bytes.

No vision model runs here: the server's runner is a stand-in that records what it is sent
(the pipe's contract) and answers; the capability facts come from tiny GGUFs written here
(a `gemma3.vision.block_count` key, or a llama.cpp `clip` projector layer). The runner's
side (placing, decoding and encoding the images) is tested with the vision models.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import gguf
import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from starlette.testclient import TestClient

from herd import envconfig
from herd.api import image_bytes
from herd.cli.client import show_facts
from herd.cli.env import CliEnv
from herd.cli.main import cli
from herd.cli.repl import Repl
from herd.cli.show import render_info
from herd.cli.stream import attach_images, extract_images
from herd.errors import HerdError
from herd.server import scheduler as sched
from herd.server.app import Settings, create_app
from herd.server.openai_api import _content
from herd.store import Store
from herd.store.facts import load_facts
from herd.store.layout import MEDIA_MODEL, MEDIA_PROJECTOR, Layer, Manifest


def png(color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (3, 2)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


PNG = png()
B64 = base64.b64encode(PNG).decode()
JPEG_B64 = base64.b64encode(b"\xff\xd8\xff\xe0 not really a jpeg").decode()


# ---- tiny GGUFs ----------------------------------------------------------------------------
def write_gguf(path: Path, arch: str, kv: dict[str, Any], tensors: dict[str, tuple[int, ...]]):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_file_type(1)
    for key, value in kv.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    for name, shape in tensors.items():
        w.add_tensor(name, np.zeros(shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TEXT_TENSORS = {"token_embd.weight": (16, 8), "output_norm.weight": (8,)}


def text_gguf(tmp: Path) -> Path:
    kv = {"llama.context_length": 2048, "llama.embedding_length": 8}
    return write_gguf(tmp / "text.gguf", "llama", kv, TEXT_TENSORS)


def vision_gguf(tmp: Path) -> Path:
    """Ollama's layout: one GGUF with the text model and its vision tower (`v.*`, `mm.*`)."""
    kv = {
        "gemma3.context_length": 2048,
        "gemma3.embedding_length": 8,
        "gemma3.vision.block_count": 1,
        "gemma3.vision.embedding_length": 4,
        "gemma3.vision.image_size": 28,
    }
    tensors = {**TEXT_TENSORS, "v.patch_embd.weight": (4, 3, 2, 2), "mm.input_projection": (4, 8)}
    return write_gguf(tmp / "vision.gguf", "gemma3", kv, tensors)


def projector_gguf(tmp: Path) -> Path:
    """llama.cpp's layout: the vision part alone, a `clip` GGUF."""
    kv = {
        "general.type": "mmproj",
        "clip.has_vision_encoder": True,
        "clip.vision.block_count": 1,
        "clip.vision.embedding_length": 32,
        "clip.vision.projection_dim": 8,
    }
    tensors = {"v.patch_embd.weight": (32, 3, 2, 2), "mm.0.weight": (8, 32)}
    return write_gguf(tmp / "mmproj.gguf", "clip", kv, tensors)


def store_with_models(tmp: Path) -> Store:
    """ "text" (no vision), "vision" (one GGUF) and "split" (text GGUF + projector layer)."""
    store = Store(tmp / "models")

    def blob(path: Path, media_type: str = MEDIA_MODEL) -> Layer:
        with store.blob_writer() as w:
            w.write(path.read_bytes())
            layer = w.commit()
        return Layer(media_type, layer.digest, layer.size)

    text = blob(text_gguf(tmp))
    store.write_model("text", text)
    store.write_model("vision", blob(vision_gguf(tmp)))
    store.write_model("split", text)
    manifest, _ = store.read_manifest("split")
    projector = blob(projector_gguf(tmp), MEDIA_PROJECTOR)
    store.write_manifest("split", Manifest(manifest.config, (*manifest.layers, projector)))
    return store


# ---- the server, with a runner stand-in ---------------------------------------------------
class Recorder:
    """A runner process stand-in: records each request's payload, answers "a cat"."""

    alive = True

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []

    async def request(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.payloads.append(payload)
        yield {"text": "a cat"}
        yield {"done": True, "done_reason": "stop", "prompt_eval_count": 3, "eval_count": 1}

    async def stop(self) -> None:
        self.alive = False


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[TestClient, Recorder]:
    store = store_with_models(tmp_path)
    app = create_app(Settings(store, envconfig.host(), memory_limit=2**40))
    scheduler, recorder = app.state.scheduler, Recorder()

    async def load(spec: sched.LoadSpec, estimate: int) -> sched.Runner:
        runner = sched.Runner(spec, recorder, estimate, 1, asyncio.Semaphore(1))  # type: ignore[arg-type]
        scheduler.runners[spec.name] = runner
        return runner

    monkeypatch.setattr(scheduler, "_load", load)
    return TestClient(app, base_url="http://localhost"), recorder


class ToApp(httpx.BaseTransport):
    """An httpx transport that hands each request to the app's test client."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.client.request(
            request.method, str(request.url), content=request.read(), headers=request.headers
        )
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)


def ollama_client(client: TestClient) -> Any:
    ollama = pytest.importorskip("ollama")
    return ollama.Client(host="http://localhost", transport=ToApp(client))


def openai_client(client: TestClient) -> Any:
    openai = pytest.importorskip("openai")
    http = httpx.Client(transport=ToApp(client))
    return openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)


def answers_normally(client: TestClient, model: str = "text") -> None:
    """The server still serves an ordinary request."""
    r = client.post("/api/generate", json={"model": model, "prompt": "hi", "stream": False})
    assert (r.status_code, r.json()["response"]) == (200, "a cat")


def image_part(url: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": url}


def test_images_reach_the_runner_as_base64(served: tuple[TestClient, Recorder]) -> None:
    client, recorder = served
    ollama = ollama_client(client)

    r = ollama.generate(model="vision", prompt="what is this?", images=[PNG])
    assert r.response == "a cat"
    assert recorder.payloads[-1]["images"] == [B64]
    assert recorder.payloads[-1]["prompt"] == "what is this?"
    # base64 broken into lines (as MIME writes it) goes on without the line breaks
    lines = "\r\n".join(B64[i : i + 76] for i in range(0, len(B64), 76))
    body = {"model": "vision", "prompt": "x", "images": [lines], "stream": False}
    assert client.post("/api/generate", json=body).status_code == 200
    assert "\n" in lines and recorder.payloads[-1]["images"] == [B64]

    conversation = [
        {"role": "user", "content": "and this?", "images": [PNG, base64.b64decode(JPEG_B64)]},
        {"role": "assistant", "content": "two things"},
        {"role": "user", "content": "thanks"},
    ]
    parts = list(ollama.chat(model="vision", messages=conversation, stream=True))
    assert "".join(p.message.content for p in parts) == "a cat" and parts[-1].done
    sent = recorder.payloads[-1]["messages"]
    assert sent[0] == {"role": "user", "content": "and this?", "images": [B64, JPEG_B64]}
    assert [("images" in m) for m in sent] == [True, False, False]

    # OpenAI: data URLs (object and plain-string forms, a bare "data:;base64,") as images,
    # the text parts joined
    content = [
        {"type": "text", "text": "compare "},
        image_part({"url": f"data:image/png;base64,{B64}"}),
        {"type": "text", "text": "with"},
        image_part(f"data:image/jpeg;base64,{JPEG_B64}"),
        image_part({"url": f"data:;base64,{B64}"}),
    ]
    oa = openai_client(client)
    out = oa.chat.completions.create(
        model="vision", messages=[{"role": "user", "content": content}]
    )
    assert out.choices[0].message.content == "a cat"
    [message] = recorder.payloads[-1]["messages"]
    assert message == {"role": "user", "content": "compare with", "images": [B64, JPEG_B64, B64]}

    # the projector layer's model takes images too
    ollama.generate(model="split", prompt="what is this?", images=[PNG])
    assert recorder.payloads[-1]["images"] == [B64]


@pytest.mark.parametrize("model", ["text"])
def test_images_to_a_text_only_model_are_400(
    served: tuple[TestClient, Recorder], model: str
) -> None:
    ollama_pkg = pytest.importorskip("ollama")
    openai_pkg = pytest.importorskip("openai")
    client, recorder = served
    ollama, oa = ollama_client(client), openai_client(client)
    words = f'"{model}" does not support vision'

    with pytest.raises(ollama_pkg.ResponseError) as e:
        ollama.generate(model=model, prompt="what is this?", images=[PNG])
    assert (e.value.status_code, e.value.error) == (400, words)
    answers_normally(client)
    with pytest.raises(ollama_pkg.ResponseError) as e:
        ollama.chat(model=model, messages=[{"role": "user", "content": "hi", "images": [PNG]}])
    assert (e.value.status_code, e.value.error) == (400, words)
    answers_normally(client)
    content = [{"type": "text", "text": "what?"}, image_part({"url": f"data:;base64,{B64}"})]
    with pytest.raises(openai_pkg.BadRequestError) as oe:
        oa.chat.completions.create(model=model, messages=[{"role": "user", "content": content}])
    assert oe.value.status_code == 400 and words in str(oe.value)
    answers_normally(client)
    assert all("images" not in p for p in recorder.payloads)  # nothing with images went out


@pytest.mark.parametrize(
    "images, at",
    [
        (["%%%%"], "images[0]: illegal base64 data at input byte 0"),
        ([B64, "Zm9v!"], "images[1]: illegal base64 data at input byte 4"),
        (["Zm9vYg"], "images[0]: illegal base64 data at input byte 4"),  # no padding
        (["data:image/png;base64," + B64], "images[0]: illegal base64 data at input byte 4"),
    ],
    ids=["not-base64", "second-bad", "unpadded", "data-url"],
)
def test_bad_base64_is_400(served: tuple[TestClient, Recorder], images: list[str], at: str) -> None:
    client, recorder = served
    r = client.post("/api/generate", json={"model": "vision", "prompt": "x", "images": images})
    assert (r.status_code, r.json()) == (400, {"error": f"invalid image data in {at}"})
    answers_normally(client, "vision")
    messages = [
        {"role": "user", "content": "x"},
        {"role": "user", "content": "y", "images": images},
    ]
    r = client.post("/api/chat", json={"model": "vision", "messages": messages})
    assert (r.status_code, r.json()) == (400, {"error": f"invalid image data in messages[1].{at}"})
    answers_normally(client, "vision")
    r = client.post("/api/generate", json={"model": "vision", "prompt": "x", "images": B64})
    assert r.status_code == 400 and "list of base64" in r.json()["error"]
    assert len(recorder.payloads) == 2  # only the normal requests reached the runner


def test_bad_base64_through_the_ollama_client(served: tuple[TestClient, Recorder]) -> None:
    ollama_pkg = pytest.importorskip("ollama")
    client, _ = served
    with pytest.raises(ollama_pkg.ResponseError) as e:  # the client lets "%%%%" through
        ollama_client(client).generate(model="vision", prompt="x", images=["%%%%"])
    assert e.value.status_code == 400 and "illegal base64 data" in e.value.error
    answers_normally(client, "vision")


@pytest.mark.parametrize(
    "url, message",
    [
        (
            "https://example.com/cat.png",
            "image URLs are not currently supported, please use base64 encoded data instead",
        ),
        (
            "http://example.com/cat.png",
            "image URLs are not currently supported, please use base64 encoded data instead",
        ),
        ("data:image/png;base64,@@@@", "invalid image input"),
        ("data:image/png," + B64, "invalid image input"),  # not base64-encoded
        ("data:text/plain;base64,aGk=", "invalid image input"),
        ("ftp://example.com/cat.png", "invalid image input"),
        (f"data:image/png;base64,{B64[:-1]}", "invalid image input"),  # truncated
    ],
    ids=["https", "http", "bad-base64", "no-base64", "not-image", "ftp", "truncated"],
)
def test_openai_image_urls_that_are_400(
    served: tuple[TestClient, Recorder], url: str, message: str
) -> None:
    openai_pkg = pytest.importorskip("openai")
    client, recorder = served
    content = [{"type": "text", "text": "what?"}, image_part({"url": url})]
    with pytest.raises(openai_pkg.BadRequestError) as e:
        openai_client(client).chat.completions.create(
            model="vision", messages=[{"role": "user", "content": content}]
        )
    assert e.value.status_code == 400
    assert e.value.body["message"] == message  # type: ignore[index]
    answers_normally(client, "vision")
    assert len(recorder.payloads) == 1


@pytest.mark.parametrize(
    "content, text, images",
    [
        ("plain", "plain", []),
        (None, "", []),
        ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "ab", []),
        ([image_part({"url": f"data:image/webp;base64,{B64}"})], "", [B64]),
        ([image_part(f"data:image/PNG;base64,{B64}"), {"type": "text", "text": "x"}], "x", [B64]),
    ],
    ids=["string", "none", "texts", "image-only", "string-url"],
)
def test_openai_content_parts(content: Any, text: str, images: list[str]) -> None:
    assert _content(content) == (text, images)


@pytest.mark.parametrize(
    "content",
    [
        [image_part({"detail": "high"})],
        [image_part(None)],
        [{"type": "input_audio", "input_audio": {}}],
        [{"type": "video"}],
        b"x",
    ],
    ids=["no-url", "null-url", "audio", "unknown-part", "bytes"],
)
def test_openai_content_parts_that_are_400(content: Any) -> None:
    with pytest.raises(HerdError):
        _content(content)


# ---- /api/show and `herd show` -------------------------------------------------------------
def test_show_capabilities_and_projector_info(served: tuple[TestClient, Recorder]) -> None:
    client, _ = served
    shown = {
        m: client.post("/api/show", json={"model": m}).json() for m in ("text", "vision", "split")
    }
    assert "vision" not in shown["text"]["capabilities"]
    assert "projector_info" not in shown["text"]
    assert shown["vision"]["capabilities"][:2] == ["completion", "vision"]
    assert shown["vision"]["projector_info"] == {
        "general.architecture": "gemma3",
        "general.parameter_count": 4 * 3 * 2 * 2 + 4 * 8,  # the v.* and mm.* tensors
        "gemma3.vision.block_count": 1,
        "gemma3.vision.embedding_length": 4,
        "gemma3.vision.image_size": 28,
    }
    assert shown["split"]["capabilities"][:2] == ["completion", "vision"]
    info = shown["split"]["projector_info"]
    assert info["general.architecture"] == "clip"
    assert info["general.parameter_count"] == 32 * 3 * 2 * 2 + 8 * 32
    assert (info["clip.vision.embedding_length"], info["clip.vision.projection_dim"]) == (32, 8)

    # `herd show` of a server's model: rebuilt from /api/show, it lists the same
    for name, rows in (
        ("vision", [["architecture", "gemma3"], ["parameters", "80"], ["embedding length", "4"]]),
        ("split", [["architecture", "clip"], ["parameters", "640"], ["embedding length", "32"],
                   ["dimensions", "8"]]),
    ):  # fmt: skip
        text = render_info(show_facts(shown[name], name))
        assert section(text, "Capabilities")[:2] == [["completion"], ["vision"]]
        assert section(text, "Projector") == rows
    assert section(render_info(show_facts(shown["text"], "text")), "Projector") is None


def section(text: str, header: str) -> list[list[str]] | None:
    """The rows of a section of `herd show`'s text, cells split at runs of spaces."""
    for block in text.split("\n\n"):
        lines = block.strip("\n").splitlines()
        if lines and lines[0].strip() == header:
            return [re.split(r"\s{2,}", line.strip()) for line in lines[1:]]
    return None


def test_show_of_a_gguf_file(tmp_path: Path) -> None:
    facts = load_facts(str(vision_gguf(tmp_path)), Store(tmp_path / "models"))
    assert "vision" in facts.capabilities
    text = render_info(facts)
    assert ["vision"] in section(text, "Capabilities")  # type: ignore[operator]
    assert section(text, "Projector") == [
        ["architecture", "gemma3"], ["parameters", "80"], ["embedding length", "4"]
    ]  # fmt: skip
    facts = load_facts(str(text_gguf(tmp_path)), Store(tmp_path / "models"))
    assert "vision" not in facts.capabilities and facts.projector_info is None
    assert section(render_info(facts), "Projector") is None


def test_show_from_the_store(tmp_path: Path) -> None:
    store = store_with_models(tmp_path)
    split = load_facts("split", store)
    assert split.projector is not None and "vision" in split.capabilities
    assert "vision" not in load_facts("text", store).capabilities


# ---- the CLI: image paths in the prompt -----------------------------------------------------
@pytest.fixture
def photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Image files: a plain name, names with spaces and parentheses, one under ~."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    files = {
        "a.png": png((1, 2, 3)),
        "my photo.JPG": b"\xff\xd8\xff\xe0jpeg bytes",
        "pic (1).webp": b"RIFF\x10\x00\x00\x00WEBPVP8 ",
        "home/cat.jpeg": b"\xff\xd8\xff\xdbother jpeg",
    }
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    return {str(tmp_path / name): data for name, data in files.items()}


def test_extract_images(photos: dict[str, bytes], tmp_path: Path) -> None:
    [a, photo, pic, cat] = photos
    notes: list[str] = []
    escaped = photo.replace(" ", "\\ ")
    prompt = f"compare {a} with {escaped} and '{pic}', also ~/cat.jpeg and {tmp_path}/gone.png"
    text, images = extract_images(prompt, notes.append)
    assert images == [photos[a], photos[photo], photos[pic], photos[cat]]
    assert text == f"compare  with  and , also  and {tmp_path}/gone.png"  # missing: left alone
    assert notes == [f"Added image '{p}'\n" for p in (a, photo, pic, cat)]

    # an unescaped space: the path runs from its first / to the extension, as Ollama's
    text, images = extract_images(f"{photo}", notes.append)
    assert (text, images) == ("", [photos[photo]])
    text, images = extract_images("what is in photo.png or /nowhere/x.png?", notes.append)
    assert (text, images) == ("what is in photo.png or /nowhere/x.png?", [])


def test_extract_images_refuses_what_is_no_image(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("just text")
    with pytest.raises(HerdError, match="not a JPEG, PNG or WebP"):
        extract_images(f"read {tmp_path}/notes.png", lambda _: None)


class VisionLLM:
    """The CLI's LLM: records generate/chat calls, answers "a cat"; `caps` as info() says."""

    def __init__(self, caps: list[str]) -> None:
        self.caps, self.calls = caps, []

    def info(self) -> dict[str, Any]:
        return {"architecture": "gemma3", "capabilities": self.caps}

    def _answer(self, key: str) -> Iterator[dict[str, Any]]:
        body = {"response": "a cat"} if key == "response" else {"message": {"content": "a cat"}}
        yield {**body, "done": False}
        yield {"done": True, "done_reason": "stop"}

    def generate(self, prompt: str, **kw: Any) -> Iterator[dict[str, Any]]:
        self.calls.append(("generate", prompt, kw.get("images")))
        return self._answer("response")

    def chat(self, messages: list[dict[str, Any]], **kw: Any) -> Iterator[dict[str, Any]]:
        self.calls.append(("chat", [dict(m) for m in messages], None))
        return self._answer("message")


def test_attach_images_only_for_vision_models(photos: dict[str, bytes]) -> None:
    a = next(iter(photos))
    assert attach_images(VisionLLM(["completion"]), f"what is {a}", lambda _: None) == (
        f"what is {a}",
        [],
    )
    assert attach_images(VisionLLM(["completion", "vision"]), f"what is {a}", lambda _: None) == (
        "what is",
        [photos[a]],
    )


@pytest.mark.parametrize("caps", [["completion", "vision"], ["completion"]], ids=["vision", "text"])
def test_run_one_shot_attaches_images(
    photos: dict[str, bytes], tmp_path: Path, caps: list[str]
) -> None:
    a = next(iter(photos))
    llm = VisionLLM(caps)
    env = CliEnv(loader=lambda *_: llm, stdin_isatty=lambda: True)
    model = str(text_gguf(tmp_path))  # a .gguf path: run in-process, through the loader
    r = CliRunner().invoke(cli, ["run", model, f"what is in {a}"], obj=env)
    assert r.exit_code == 0, r.output
    assert "a cat" in r.stdout
    if "vision" in caps:
        assert llm.calls == [("generate", "what is in", [photos[a]])]
        assert f"Added image '{a}'" in r.stderr
    else:
        assert llm.calls == [("generate", f"what is in {a}", None)]


def test_repl_keeps_images_in_the_conversation(photos: dict[str, bytes], tmp_path: Path) -> None:
    a, photo = list(photos)[:2]
    lines = iter([f"what is {a}?", "and this one: " + photo.replace(" ", "\\ "), "thanks"])
    out: list[str] = []
    llm = VisionLLM(["completion", "vision"])
    repl = Repl(llm, lambda _: next(lines), write=out.append, write_err=out.append)
    with pytest.raises(StopIteration):
        repl.run()
    history = llm.calls[-1][1]
    assert [m.get("images") for m in history] == [[photos[a]], None, [photos[photo]], None, None]
    assert [m["content"] for m in history[::2]] == ["what is ?", "and this one:", "thanks"]

    # a file that is no image: an error, nothing sent, the conversation goes on
    (tmp_path / "bad.png").write_text("text")
    repl.send(f"see {tmp_path}/bad.png")
    assert out[-1].startswith("Error: couldn't process image") and len(llm.calls) == 3
    repl.send("still there?")
    assert len(llm.calls) == 4 and llm.calls[-1][1][-1] == {
        "role": "user",
        "content": "still there?",
    }


# ---- the library ---------------------------------------------------------------------------
def test_image_bytes(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    assert image_bytes([PNG, str(tmp_path / "a.png"), tmp_path / "a.png"]) == [PNG] * 3
    assert image_bytes(None) == [] and image_bytes([bytearray(b"xy")]) == [b"xy"]
    with pytest.raises(HerdError, match="image file not found: .*missing.png"):
        image_bytes([tmp_path / "missing.png"])
    with pytest.raises(HerdError, match="path or bytes"):
        image_bytes([3])  # type: ignore[list-item]


def test_library_sends_images_to_the_pipeline(smollm2_path: Path, tmp_path: Path) -> None:
    """A text-only model: the images are read and reach the pipeline, which refuses them in
    Ollama's words; a missing file is a HerdError before anything runs."""
    import herd
    from herd.errors import CapabilityError

    (tmp_path / "a.png").write_bytes(PNG)
    llm = herd.load(smollm2_path)
    try:
        assert "vision" not in llm.info()["capabilities"]
        words = f'"{llm.name}" does not support vision'
        with pytest.raises(CapabilityError, match=words):
            llm.generate("what is this?", images=[tmp_path / "a.png"])
        with pytest.raises(CapabilityError, match=words):
            llm.chat([{"role": "user", "content": "and this?", "images": [PNG]}])
        with pytest.raises(HerdError, match="image file not found"):
            llm.chat([{"role": "user", "content": "?", "images": [str(tmp_path / "nope.jpg")]}])
        assert llm.generate("hi", options={"num_predict": 2})["done"]  # still answers
    finally:
        llm.close()


class Recording:
    """The CLI's server client stand-in: records bodies, answers one done line."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self.bodies.append(body)
        yield {"done": True}

    def request(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.bodies.append(body)
        return {"done": True}


def test_remote_llm_sends_images_in_base64() -> None:
    from herd.cli.client import RemoteLLM

    client = Recording()
    llm = RemoteLLM(client, "m")  # type: ignore[arg-type]
    list(llm.generate("what?", images=[PNG], stream=True))  # type: ignore[arg-type]
    assert client.bodies[-1]["images"] == [B64]
    conversation = [{"role": "user", "content": "and?", "images": [PNG]}, {"role": "user"}]
    llm.chat(conversation)
    assert client.bodies[-1]["messages"] == [
        {"role": "user", "content": "and?", "images": [B64]},
        {"role": "user"},
    ]
    assert conversation[0]["images"] == [PNG]  # the REPL's conversation keeps the bytes
    llm.generate("plain")
    assert "images" not in client.bodies[-1]
