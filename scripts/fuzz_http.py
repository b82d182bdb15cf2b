"""Hostile requests against a real `herd serve`, in phases, each followed by a normal one.

    python scripts/fuzz_http.py --requests 5000 [--seed S] [--timeout 8] [--smollm2]

The server runs on a free port with HERD_API_KEY set and a temporary store holding a tiny
random Llama with SmolLM2's tokenizer and chat template (or, with --smollm2, SmolLM2 135M
itself; both take smollm2:135m from the test store in HERD_CACHE, pulled there as the
tests pull it when it is missing), on the NumPy backend.
Requests go over raw sockets, so that bodies can be anything: every route of both APIs and
the store routes, in phases:

  types       every field of every route with a value of each JSON type
  numbers     NaN, Infinity (literal and string), 2^31, 2^63, 10^400, 1e30, -1 in every
              number field, the options and OpenAI's sampling fields
  strings     huge strings, lone-surrogate escapes, control characters, unknown fields
  names       bad model names, path traversal, bad digests, on every name and path
  structures  wrongly shaped messages, tools, images, format, stream_options; nesting
  templates   request templates that double strings, printf widths, Jinja
  bodies      broken UTF-8, truncated and non-object JSON, bodies past the size limit
  transport   partial bodies (the client leaves), slow bodies within bounds, wrong or
              missing Content-Length, chunked garbage
  auth        missing, malformed and non-ASCII Authorization headers

After each phase a normal generate request must answer 200 with text. Printed at the end:
the status histogram, the 5xx answers (must be 0, 501 included; each with its request),
tracebacks in the server's log (must be 0), phases after which the normal request failed
(must be 0), client timeouts (a request left after --timeout s: a long generation a hostile
num_predict asked for, cancelled by leaving), and the seed. Exit status 1 when a figure is off.

Pulls and pushes get invalid names only: a valid one would go to a registry, and the fuzz
run has no network.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fuzz:tiny"
KEY = "fuzz-key"
PHASES = [
    "types", "numbers", "strings", "names", "structures", "templates", "bodies", "transport",
    "auth",
]  # fmt: skip


class Raw(str):
    """A JSON token written as is (NaN, 1e999, a 5000-digit number): no JSON encoder makes
    them all."""


def encode(value: Any) -> bytes:
    raws: list[str] = []

    def mark(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(str(v))
            return f"\x00RAW{len(raws) - 1}\x00"
        if isinstance(v, dict):
            return {mark(k) if isinstance(k, Raw) else k: mark(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x) for x in v]
        return v

    text = json.dumps(mark(value), allow_nan=True)
    for i, raw in enumerate(raws):
        text = text.replace(f'"\\u0000RAW{i}\\u0000"', raw)
    return text.encode("utf-8", "surrogatepass")


# ---- what to send ----------------------------------------------------------------------------
USER = [{"role": "user", "content": "hi"}]
FAST = {"num_predict": 3, "temperature": 0}
# (method, path, base body, fields to mutate)
ROUTES: list[tuple[str, str, dict[str, Any] | None, list[str]]] = [
    ("POST", "/api/generate", {"model": MODEL, "prompt": "hi", "stream": False, "options": FAST},
     ["prompt", "suffix", "system", "template", "context", "raw", "stream", "format",
      "keep_alive", "images", "options", "think", "truncate", "shift", "logprobs",
      "top_logprobs", "model"]),
    ("POST", "/api/chat", {"model": MODEL, "messages": USER, "stream": False, "options": FAST},
     ["messages", "tools", "format", "options", "stream", "keep_alive", "think", "truncate",
      "shift", "logprobs", "top_logprobs", "model"]),
    ("POST", "/api/embed", {"model": MODEL, "input": "hi"},
     ["input", "truncate", "dimensions", "options", "keep_alive", "model"]),
    ("POST", "/api/embeddings", {"model": MODEL, "prompt": "hi"}, ["prompt", "options", "model"]),
    ("POST", "/api/show", {"model": MODEL}, ["model", "name", "verbose"]),
    ("POST", "/api/copy", {"source": MODEL, "destination": "fuzz-copy"},
     ["source", "destination"]),
    ("DELETE", "/api/delete", {"model": "fuzz-copy"}, ["model", "name"]),
    ("POST", "/api/pull", {"model": "bad name!", "stream": False},
     ["model", "name", "insecure", "stream"]),
    ("POST", "/api/push", {"model": "../bad", "stream": False}, ["model", "insecure", "stream"]),
    ("POST", "/api/create", {"model": "fuzz-made", "from": MODEL, "stream": False},
     ["model", "from", "files", "adapters", "template", "system", "license", "parameters",
      "messages", "quantize", "stream"]),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 3},
     ["messages", "temperature", "top_p", "frequency_penalty", "presence_penalty", "seed",
      "max_tokens", "max_completion_tokens", "stop", "stream", "stream_options", "tools",
      "response_format", "reasoning_effort", "reasoning", "logprobs", "top_logprobs", "model"]),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3},
     ["prompt", "suffix", "temperature", "top_p", "seed", "max_tokens", "stop", "stream",
      "stream_options", "logprobs", "frequency_penalty", "model"]),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": "hi"},
     ["input", "encoding_format", "dimensions", "model"]),
    ("GET", "/api/tags", None, []), ("GET", "/api/ps", None, []), ("GET", "/metrics", None, []),
    ("GET", "/api/version", None, []), ("GET", "/v1/models", None, []),
]  # fmt: skip
OPTION_NAMES = [
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "num_keep", "seed",
    "num_predict", "top_k", "top_p", "min_p", "typical_p", "repeat_last_n", "temperature",
    "repeat_penalty", "presence_penalty", "frequency_penalty", "stop", "mirostat",
]  # fmt: skip
TYPES = [None, True, False, 0, -1, 1.5, "", "x", [], [1], ["a"], {}, {"a": 1}, [{}], [[]]]
NUMBERS = [
    Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), "NaN", "nan", "Infinity", "-inf", "1e309",
    Raw("1e309"), Raw("-1e999"), 2**31, 2**31 - 1, 2**63, 2**64, -(2**63), Raw("9" * 400),
    Raw("9" * 5000), 10**30, 1e30, -1, -2, 0, -0.0, 1e-320, 3.5e38, 1.5, "5", " 7 ", "0x10",
]  # fmt: skip
STRINGS = [
    "x" * 1_000_000, "\x00", "\x1b[2J", "%s%n%x", "{{", "}}", "😀" * 1000, Raw('"\\ud800"'),
    Raw('"a\\udfffb"'), Raw('"\\ud83d\\ude00"'), "\u202e", "\ufeff", "a\nb\r\n", "\\", '"',
]  # fmt: skip
NAMES = [
    "", " ", "../../etc/passwd", "..", "a/../../b", "/abs", "x" * 1000, "a:b:c", "bad name!",
    "m@sha256:zz", "registry.ollama.ai/library/../../x", "%2e%2e", "\x00", "ü", "a" * 300,
    "sha256:" + "0" * 64, "sha256-" + "f" * 64, "sha256:../../x", "sha256:" + "g" * 64,
]  # fmt: skip
DEEP = [Raw("[" * n + "]" * n) for n in (65, 1000, 10_000, 50_000)] + [
    Raw('{"a":' * 2000 + "1" + "}" * 2000)
]
STRUCTURES: dict[str, list[Any]] = {
    "messages": [
        "hi", ["hi"], [None], [{}], [{"role": 5}], [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        [{"role": "user", "images": "x"}], [{"role": "user", "images": ["!!"]}],
        [{"role": "user", "images": [5]}], [{"role": "assistant", "tool_calls": "x"}],
        [{"role": "assistant", "tool_calls": [5]}],
        [{"role": "assistant", "tool_calls": [{"function": {"arguments": "[" * 3000}}]}],
        [{"role": "assistant", "tool_calls": [{"function": {"arguments": '{"a": NaN}'}}]}],
        [{"role": "assistant", "tool_calls": [{"function": {"index": -5, "name": 3}}]}],
        [{"role": "tool", "tool_name": ["x"], "content": "r"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": "file:///etc/pw"}]}],
        [{"role": "user", "content": "hi"}] * 2000,
    ],
    "tools": [
        {"a": 1}, [5], [{"function": 5}], [{"function": {"parameters": 5}}],
        [{"function": {"parameters": {"properties": [1]}}}],
        [{"function": {"parameters": {"properties": {"a": {"type": 5}}}}}],
        [{"function": {"parameters": {"properties": {"a": {"enum": "abc"}}}}}],
        [{"function": {"name": "f", "parameters": {"required": "a"}}}],
    ],
    "format": [5, [1], "xml", {"type": 5}, {"$ref": "#"}, {"type": "string", "pattern": "("},
               {"type": "string", "maxLength": 2**63}],
    "images": ["x", [5], ["!!!"], ["aGVsbG8"], [None]],
    "stream_options": ["yes", [1], {"include_usage": "y"}, {"include_usage": 5}],
    "context": ["1,2", [1.5], ["7"], [-1], [2**31], [2**63], [10**9], [True], [None]],
    "options": [5, "x", [1], {"num_thread": 1e30}, {"num_ctx": 2**40}, {"stop": [1]}],
    "stop": [[1], {"a": 1}, 5],
    "response_format": [5, {"type": "xml"}, {"type": "json_schema"},
                        {"type": "json_schema", "json_schema": {"schema": 5}}],
    "parameters": [5, {"num_thread": 1e30}, {"temperature": "NaN"}, {"x": 1}, {"stop": [1]}],
    "files": [5, {"../x": "sha256:" + "1" * 64}, {"a.gguf": "x"}, {"a.gguf": 5}],
}  # fmt: skip
AUTH = [
    None, b"", b"Bearer", b"Bearer ", b"Bearer s\xc3\xa9cret", b"Bearer \xff\xfe", b"\x00\x01",
    b"Basic " + KEY.encode(), b"bearer " + KEY.encode() + b"x", b"Bearer " + b"k" * 10000,
    b"Bearer " + KEY.encode()[:-1], "Bearer ключ".encode(),
]  # fmt: skip
TEMPLATES = [
    '{{$s := "aaaaaaaa"}}{{range 40}}{{$s = print $s $s}}{{end}}{{$s}}',
    '{{$s := "aa"}}{{range 22}}{{$s = print $s $s}}{{end}}'
    + "".join(f"{{{{$v{i} := print $s $s}}}}" for i in range(30)),
    '{{printf "%.1000000000f" 1.0}}', '{{printf "%9999999d" 1}}', "{{ range 100000000 }}x{{ end }}",
    "{{ template \"a\" }}{{ define \"a\" }}{{ template \"a\" }}{{ end }}", "{{ .Nope.x }}",
    "{{ 'a'.ljust(1000000000) }}", "{% for i in range(100) %}{{ i }}{% endfor %}", "{{ if }}",
]  # fmt: skip


def pool(phase: str, field: str, rng: random.Random) -> Any:
    """A hostile value for `field` in `phase`."""
    if phase == "types":
        return rng.choice(TYPES)
    if phase == "numbers":
        if field == "options":
            return {rng.choice(OPTION_NAMES): rng.choice(NUMBERS) for _ in range(rng.randint(1, 3))}
        return rng.choice(NUMBERS)
    if phase == "strings":
        return rng.choice(STRINGS)
    if phase == "names":
        return rng.choice(NAMES)
    if phase == "structures":
        return rng.choice(STRUCTURES.get(field) or DEEP)
    if phase == "templates" and field in ("template", "system", "prompt"):
        return rng.choice(TEMPLATES)
    return rng.choice(TYPES + NUMBERS[:10] + NAMES[:6])


def hostile_json(phase: str, rng: random.Random) -> tuple[str, str, bytes | None]:
    method, path, base, fields = rng.choice(ROUTES)
    if base is None:  # a GET route: query junk, or a name in the path
        if rng.random() < 0.5:
            name = rng.choice(NAMES + [MODEL])
            return "GET", "/v1/models/" + quote(name), None
        return method, path + "?" + quote(rng.choice(STRINGS[:6] + NAMES)), None
    body = dict(base)
    for _ in range(rng.randint(1, 3)):
        field = rng.choice([*fields, "unknown_" + str(rng.randint(0, 9))])
        body[field] = pool(phase, field, rng)
    if path in ("/api/pull", "/api/push") and _valid_name(body.get("model") or body.get("name")):
        body["model"] = rng.choice(NAMES[2:4])  # a valid one would go to the network
    if path == "/api/create" and body.get("from") != MODEL and _valid_name(body.get("from")):
        body["from"] = rng.choice(NAMES[2:4])  # so would a model to create from not here
    if phase == "templates":
        body["template"] = rng.choice(TEMPLATES)
        path = rng.choice(["/api/generate", "/api/create"])
        body.update(model="fuzz-made" if path == "/api/create" else MODEL, prompt="hi")
        body.setdefault("from", MODEL)
    return method, path, encode(body)


def _valid_name(name: Any) -> bool:
    from herd.store import names

    try:
        names.parse(name)
    except Exception:  # any refusal: the server answers it without the network
        return False
    return True


def quote(text: str) -> str:
    from urllib.parse import quote as q

    return q(text, safe="/:", errors="surrogatepass")


# ---- the wire ------------------------------------------------------------------------------
class Answer:
    def __init__(self, status: int | None, data: bytes, note: str = "") -> None:
        self.status, self.data, self.note = status, data, note


def exchange(
    port: int,
    head: bytes,
    body: bytes = b"",
    *,
    timeout: float,
    chunks: int = 1,
    pause: float = 0.0,
    cut: bool = False,
) -> Answer:
    """Send a request (head + body, in `chunks` pieces `pause` s apart; `cut`: close the
    write side before the body is all there) and read the whole answer."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as e:
        return Answer(None, b"", f"refused: {type(e).__name__}")
    with s:
        try:
            s.sendall(head)
            step = max(1, len(body) // chunks)
            for i in range(0, len(body), step):
                s.sendall(body[i : i + step])
                if pause:
                    time.sleep(pause)
            if cut:
                s.shutdown(socket.SHUT_WR)
            data = b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                piece = s.recv(65536)
                if not piece:
                    break
                data += piece
            else:
                return Answer(None, data, "timeout")
        except TimeoutError:
            return Answer(None, b"", "timeout")
        except OSError as e:  # the server closed on us (a body it refused unread)
            return Answer(None, b"", f"closed: {type(e).__name__}")
    if not data.startswith(b"HTTP/1.1 "):
        return Answer(None, data, "no answer")
    return Answer(int(data[9:12]), data)


def request_head(
    port: int,
    method: str,
    path: str,
    length: int | None,
    auth: bytes | None = b"Bearer " + KEY.encode(),
    extra: bytes = b"",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), f"Host: 127.0.0.1:{port}".encode()]
    lines.append(b"Connection: close")
    lines.append(b"Content-Type: application/json")
    if auth is not None:
        lines.append(b"Authorization: " + auth)
    if length is not None:
        lines.append(f"Content-Length: {length}".encode())
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"


def body_of(answer: Answer) -> Any:
    head, _, rest = answer.data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():  # one JSON answer: join the chunks
        out, rest_ = b"", rest
        while rest_:
            size, _, rest_ = rest_.partition(b"\r\n")
            n = int(size or b"0", 16)
            if n == 0:
                break
            out, rest_ = out + rest_[:n], rest_[n + 2 :]
        rest = out
    return json.loads(rest) if rest.strip() else None


def error_shape_ok(method: str, path: str, answer: Answer) -> bool:
    """An error in the API's own shape (Ollama {"error": str}, OpenAI {"error": {message}});
    HEAD answers and 499 (the client left) have no body."""
    if method == "HEAD" or answer.status == 499:
        return True
    try:
        error = body_of(answer)["error"]
    except (ValueError, TypeError, KeyError):
        return False
    if path.startswith("/v1/"):
        return isinstance(error, dict) and isinstance(error.get("message"), str)
    return isinstance(error, str)


# ---- phases that break the body, the transport, the headers -----------------------------------
def hostile_raw(
    phase: str, port: int, rng: random.Random, timeout: float
) -> tuple[str, str, str, Answer]:
    """(method, path, what was sent, answer) for the bodies, transport and auth phases."""
    method, path, body = hostile_json("types", rng)
    if body is None:
        method, path, body = "POST", "/api/generate", encode({"model": MODEL, "prompt": "hi"})
    if phase == "bodies":
        kind = rng.choice(["utf8", "truncate", "flip", "bom", "scalar", "empty", "huge", "deep"])
        if kind == "utf8":
            at = rng.randrange(len(body))
            body = (
                body[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88"]) + body[at:]
            )
        elif kind == "truncate":
            body = body[: rng.randrange(len(body))]
        elif kind == "flip":
            at = rng.randrange(len(body))
            body = body[:at] + bytes([body[at] ^ (1 << rng.randrange(8))]) + body[at + 1 :]
        elif kind == "bom":
            body = b"\xef\xbb\xbf" + body
        elif kind == "scalar":
            body = rng.choice([b"null", b"1", b'"x"', b"[]", b"true", b"NaN"])
        elif kind == "empty":
            body = rng.choice([b"", b" ", b"\n"])
        elif kind == "huge" and rng.random() < 0.05:  # past the 32 MiB limit (rarely: slow)
            body = b'{"model": "' + MODEL.encode() + b'", "prompt": "' + b"x" * (33 << 20) + b'"}'
        else:
            kind, body = "deep", encode(rng.choice(DEEP))
        head = request_head(port, method, path, len(body))
        return method, path, kind, exchange(port, head, body, timeout=timeout)
    if phase == "transport":
        kind = rng.choice(["partial", "slow", "short", "no-length", "chunked", "junk-header"])
        if kind == "partial":  # says more than it sends, then leaves
            head = request_head(port, method, path, len(body) + rng.randint(1, 1000))
            return method, path, kind, exchange(port, head, body, timeout=timeout, cut=True)
        if kind == "slow":  # within bounds: a few pieces, 50 ms apart
            head = request_head(port, method, path, len(body))
            return (
                method,
                path,
                kind,
                exchange(port, head, body, timeout=timeout, chunks=5, pause=0.05),
            )
        if kind == "short":  # says less than it sends
            head = request_head(port, method, path, max(0, len(body) - rng.randint(1, 10)))
            return method, path, kind, exchange(port, head, body, timeout=timeout)
        if kind == "no-length":
            return (
                method,
                path,
                kind,
                exchange(
                    port, request_head(port, method, path, None), body, timeout=timeout, cut=True
                ),
            )
        if kind == "chunked":
            head = request_head(port, method, path, None, extra=b"Transfer-Encoding: chunked\r\n")
            junk = rng.choice(
                [
                    b"zz\r\n" + body + b"\r\n0\r\n\r\n",
                    b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n",
                    b"5\r\nab",
                ]
            )
            return method, path, kind, exchange(port, head, junk, timeout=timeout, cut=True)
        extra = rng.choice(
            [
                b"X-\xff: \xfe\r\n",
                b"Host: evil.example\r\n",
                b"Content-Type: text/\xff\r\n",
                b"Content-Length: -5\r\n",
            ]
        )
        head = request_head(port, method, path, len(body), extra=extra)
        return method, path, kind, exchange(port, head, body, timeout=timeout)
    auth = rng.choice(AUTH)
    head = request_head(port, method, path, len(body), auth=auth)
    return method, path, repr(auth)[:40], exchange(port, head, body, timeout=timeout)


# ---- the server ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def smollm2_path() -> Path:
    """SmolLM2 135M's GGUF in the tests' store (tests/conftest.py), pulled there if missing
    (a fresh machine that has not run `make test` yet)."""
    from herd import envconfig
    from herd.store import Store, resolve_or_pull

    store = Store(envconfig.cache_dir() / "test-models")
    return Path(resolve_or_pull("smollm2:135m", store=store).model_path)


def tiny_bpe_model(path: Path) -> Path:
    """A random 2-layer Llama (width 32) with SmolLM2's tokenizer and chat template: byte
    level BPE, so any text encodes, and fast on the NumPy backend."""
    import numpy as np

    from herd.gguf import open_gguf
    from herd.gguf.writer import write_gguf

    source = smollm2_path()
    kv = {k: v for k, v in open_gguf(source).kv.items() if k.startswith("tokenizer.")}
    n_vocab, d = len(kv["tokenizer.ggml.tokens"]), 32
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    tensors = [("token_embd.weight", w(n_vocab, d), None), ("output_norm.weight", 1 + w(d), None)]
    for i in range(2):
        p = f"blk.{i}."
        tensors += [(p + name, w(*shape), None) for name, shape in [
            ("attn_q.weight", (d, d)), ("attn_k.weight", (16, d)), ("attn_v.weight", (16, d)),
            ("attn_output.weight", (d, d)), ("ffn_gate.weight", (64, d)),
            ("ffn_up.weight", (64, d)), ("ffn_down.weight", (d, 64))]]  # fmt: skip
        tensors += [
            (p + "attn_norm.weight", 1 + w(d), None),
            (p + "ffn_norm.weight", 1 + w(d), None),
        ]
    kv.update({
        "llama.block_count": 2, "llama.embedding_length": d, "llama.feed_forward_length": 64,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.context_length": 512, "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.dimension_count": 8, "llama.vocab_size": n_vocab,
    })  # fmt: skip
    return write_gguf(path, "llama", kv, tensors)


def make_store(tmp: Path, smollm2: bool) -> Path:
    from herd.modelfile import parse
    from herd.store import Store
    from herd.store.create import create

    if smollm2:
        gguf = smollm2_path()
    else:
        gguf = tiny_bpe_model(tmp / "tiny.gguf")
    # short answers unless a request asks otherwise
    modelfile = f"FROM {gguf}\nPARAMETER num_predict 4\nPARAMETER num_ctx 128"
    create(Store(tmp / "models"), MODEL, parse(modelfile), base_dir=tmp)
    return tmp / "models"


def start_server(tmp: Path, store: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    env = {**os.environ, "HERD_MODELS": str(store), "HERD_HOST": f"127.0.0.1:{port}",
           "HERD_BACKEND": "numpy", "HERD_NUM_PARALLEL": "2", "HERD_API_KEY": KEY}  # fmt: skip
    log = tmp / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "herd", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = exchange(port, request_head(port, "GET", "/", None), timeout=2)
        if answer.status == 200:
            return proc, port, log
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"herd serve did not start; see {log}")


def normal(port: int, timeout: float) -> bool:
    """An ordinary request answers 200 with text."""
    body = encode({"model": MODEL, "prompt": "hello", "stream": False, "options": FAST})
    answer = exchange(
        port, request_head(port, "POST", "/api/generate", len(body)), body, timeout=timeout * 4
    )
    try:
        return answer.status == 200 and isinstance(body_of(answer)["response"], str)
    except (ValueError, TypeError, KeyError):
        return False


# ---- the run -------------------------------------------------------------------------------
LONG_LINE = 16 * 1024  # h11's max_incomplete_event_size: a request line it stops reading


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=8.0, help="seconds a request may take")
    p.add_argument("--smollm2", action="store_true", help="SmolLM2 135M instead of a tiny model")
    p.add_argument("--keep", action="store_true", help="keep the temporary store and log")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"seed {seed} (reproduce: --seed {seed} --requests {args.requests})", flush=True)
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="herd-fuzz-http-"))
    proc, port, log = start_server(tmp, make_store(tmp, args.smollm2))
    statuses: collections.Counter[str] = collections.Counter()
    fivexx: list[str] = []
    bad_shape: list[str] = []
    unanswered: list[str] = []
    notes: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()  # answers worth telling apart
    failed_phases: list[str] = []
    t0 = time.monotonic()
    try:
        if not normal(port, args.timeout):
            raise SystemExit("the first normal request failed; see " + str(log))
        per_phase = max(1, -(-args.requests // len(PHASES)))  # at least --requests in all
        for phase in PHASES:
            t = time.monotonic()
            for _ in range(per_phase):
                if phase in ("bodies", "transport", "auth"):
                    method, path, sent, answer = hostile_raw(phase, port, rng, args.timeout)
                else:
                    method, path, body = hostile_json(phase, rng)
                    head = request_head(port, method, path, None if body is None else len(body))
                    answer = exchange(port, head, body or b"", timeout=args.timeout)
                    sent = (body or b"")[:200].decode("utf-8", "replace")
                statuses[str(answer.status) if answer.status else answer.note.split(":")[0]] += 1
                if answer.status is None and len(path) > LONG_LINE:
                    # h11 stops reading a request line past its limit and closes: the
                    # client, still sending, sees a reset (nginx answers 414 instead)
                    kinds["closed by uvicorn: a request line over its limit"] += 1
                elif answer.status is None and sent == "huge":  # refused at 32 MiB; the
                    kinds["closed: a body past the limit, its client still sending"] += 1
                elif answer.status is None:
                    notes[f"{phase}: {answer.note}"] += 1
                    if phase != "transport":  # there, the client leaving is the point
                        unanswered.append(f"{phase} {method} {path[:100]} {sent[:120]!r}")
                elif answer.status >= 500:
                    fivexx.append(f"{phase} {method} {path} {sent!r} -> {answer.data[-300:]!r}")
                elif answer.status == 400 and b"Invalid HTTP request received." in answer.data:
                    kinds["400 from uvicorn: no HTTP request at all"] += 1
                elif answer.status >= 400 and not error_shape_ok(method, path, answer):
                    bad_shape.append(f"{phase} {method} {path} {sent!r} -> {answer.data[-200:]!r}")
            ok = normal(port, args.timeout)
            if not ok:
                failed_phases.append(phase)
            print(f"phase {phase:<10} {per_phase} requests in {time.monotonic() - t:6.1f} s; "
                  f"normal request after it: {'ok' if ok else 'FAILED'}", flush=True)  # fmt: skip
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = log.read_text(errors="replace")
    tracebacks = text.count("Traceback (most recent call last)")
    total = sum(statuses.values())
    took = time.monotonic() - t0
    print(
        f"\n{total} hostile requests (+{len(PHASES) + 1} normal ones) in {took:.0f} s, seed {seed}"
    )
    print("statuses:", dict(sorted(statuses.items())))
    for kind, n in sorted(kinds.items()):
        print(f"  of which {kind}: {n}")
    print("no answer (client side):", dict(notes) or 0)
    for line in unanswered[:40]:
        print("  ", line)
    print(f"5xx: {len(fivexx)}")
    for line in fivexx[:20]:
        print("  ", line)
    print(f"errors not in the API's shape: {len(bad_shape)}")
    for line in bad_shape[:20]:
        print("  ", line)
    print(f"tracebacks in the server log: {tracebacks}")
    print(f"phases after which a normal request failed: {len(failed_phases)} {failed_phases}")
    if tracebacks:
        i = text.index("Traceback (most recent call last)")
        print(text[max(0, i - 300) : i + 3000])
    if args.keep:
        print("kept:", tmp)
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if fivexx or bad_shape or tracebacks or failed_phases else 0


if __name__ == "__main__":
    sys.exit(main())
