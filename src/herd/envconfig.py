"""Every environment variable herd reads, read here and nowhere else.

Each is a function so tests can change the environment at run time.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _get(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def models_dir() -> Path:
    """Root of the model store (Ollama's layout). HERD_MODELS, default ~/.herd/models."""
    value = _get("HERD_MODELS")
    return Path(value).expanduser() if value else Path.home() / ".herd" / "models"


def cache_dir() -> Path:
    """Downloads that may be reused (catalog packages). HERD_CACHE, default ~/.cache/herd."""
    value = _get("HERD_CACHE")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "herd"


def backend() -> str:
    """Compute backend: auto (default), numpy, ggml. HERD_BACKEND."""
    return _get("HERD_BACKEND", "auto").lower() or "auto"


def debug() -> bool:
    return _get("HERD_DEBUG").lower() in ("1", "true", "yes")


def context_length() -> int:
    """Default num_ctx (HERD_CONTEXT_LENGTH, else OLLAMA_CONTEXT_LENGTH, else 4096)."""
    value = _get("HERD_CONTEXT_LENGTH") or _get("OLLAMA_CONTEXT_LENGTH")
    try:
        return int(value) if value else 4096
    except ValueError:
        return 4096


def kv_cache_type() -> str:
    """KV cache element type: f16 (default), q8_0, q4_0. HERD_KV_CACHE_TYPE."""
    return (_get("HERD_KV_CACHE_TYPE") or _get("OLLAMA_KV_CACHE_TYPE") or "f16").lower()


def flash_attention() -> bool | None:
    """Flash attention forced on or off (HERD_FLASH_ATTENTION, else OLLAMA_FLASH_ATTENTION);
    None: the backend decides. Read as Go's envconfig reads a bool: 0/f/false turn it off,
    any other value on."""
    value = (_get("HERD_FLASH_ATTENTION") or _get("OLLAMA_FLASH_ATTENTION")).lower()
    if not value:
        return None
    return value not in ("0", "f", "false")


def onnx_providers() -> tuple[str, ...]:
    """The ONNX backend's execution providers, HERD_ONNX_PROVIDERS: a comma list of full
    names or short ones (cuda, dml, coreml, openvino, cpu); () (unset): the best installed.
    Whether each is installed is checked when the backend opens (an error naming those
    that are)."""
    return tuple(s.strip() for s in _get("HERD_ONNX_PROVIDERS").split(",") if s.strip())


def onnx_dequantize() -> bool:
    """Every weight float32 on the ONNX backend, none kept in its blocks (the reference
    for the quantized mapping): HERD_ONNX_DEQUANTIZE set to anything but 0."""
    return _get("HERD_ONNX_DEQUANTIZE") not in ("", "0")


def onnx_cache() -> bool:
    """Whether the ONNX backend keeps optimized sessions on disk; HERD_ONNX_CACHE=0: not."""
    return _get("HERD_ONNX_CACHE") != "0"


def onnx_kv_in_place() -> bool:
    """Whether the ONNX backend keeps its KV cache heads first, F32, and has a decoding
    row's attention write its cell in place (GroupQueryAttention); HERD_ONNX_KV_IN_PLACE=0:
    not (cells first, F16, each step's rows copied in by the host)."""
    return _get("HERD_ONNX_KV_IN_PLACE") != "0"


def onnx_cache_dir() -> Path:
    """Where it keeps them: HERD_CACHE/onnx, default ~/.cache/herd/onnx."""
    return cache_dir() / "onnx"


def rpc_servers() -> tuple[str, ...]:
    """ggml RPC servers to place layers on, HERD_RPC: a comma list of host:port (llama.cpp's
    `rpc-server` or `herd rpc-server` on other machines); checked when a model loads."""
    return tuple(s.strip() for s in _get("HERD_RPC").split(",") if s.strip())


def sched_spread() -> bool:
    """Layers spread over every GPU, not packed onto the fewest (HERD_SCHED_SPREAD, else
    OLLAMA_SCHED_SPREAD)."""
    value = (_get("HERD_SCHED_SPREAD") or _get("OLLAMA_SCHED_SPREAD")).lower()
    return value in ("1", "true", "yes")


def herd_variables() -> dict[str, str]:
    """Every HERD_* and OLLAMA_* variable set here, for processes started on other machines
    (`herd serve --ray`'s replicas), which must read the settings this one reads."""
    return {k: v for k, v in os.environ.items() if k.startswith(("HERD_", "OLLAMA_"))}


def backend_options() -> dict[str, Any]:
    """The settings above as `herd.ml.BackendOptions` fields, for an entry point that opens
    a backend (`BackendOptions(**envconfig.backend_options())`)."""
    return {
        "onnx_providers": onnx_providers(),
        "onnx_dequantize": onnx_dequantize(),
        "onnx_cache": onnx_cache(),
        "onnx_cache_dir": onnx_cache_dir(),
        "onnx_kv_in_place": onnx_kv_in_place(),
        "rpc_servers": rpc_servers(),
        "sched_spread": sched_spread(),
    }


def nohistory() -> bool:
    return _get("HERD_NOHISTORY").lower() in ("1", "true", "yes")


def noprune() -> bool:
    """Keep blobs a pull no longer references (HERD_NOPRUNE, else OLLAMA_NOPRUNE)."""
    value = (_get("HERD_NOPRUNE") or _get("OLLAMA_NOPRUNE")).lower()
    return value in ("1", "true", "yes")


def registry_key() -> Path:
    """The ed25519 key that signs registry token requests, as Ollama's (HERD_KEY, default
    ~/.ollama/id_ed25519, so a key registered with ollama.com works for herd too)."""
    value = _get("HERD_KEY")
    return Path(value).expanduser() if value else Path.home() / ".ollama" / "id_ed25519"


# ---- server -------------------------------------------------------------------------------
DEFAULT_PORT = 11434


@dataclass(frozen=True)
class HostURL:
    """Where `herd serve` listens and where clients connect (Ollama's envconfig.Host)."""

    scheme: str
    host: str  # "" binds every interface (":11434")
    port: int
    path: str = ""

    @property
    def bind_host(self) -> str:
        return self.host or "0.0.0.0"

    @property
    def base_url(self) -> str:
        """URL a client on this machine uses: an unspecified bind address means loopback."""
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        shown = f"[{host}]" if ":" in host else host
        path = f"/{self.path.strip('/')}" if self.path.strip("/") else ""
        return f"{self.scheme}://{shown}:{self.port}{path}"


def parse_host(value: str) -> HostURL:
    """`[scheme://]host[:port][/path]`; http defaults to port 80 and https to 443 only when
    the scheme is given, else 11434; a missing host is 127.0.0.1, `:port` binds all."""
    s = value.strip()
    default_port = DEFAULT_PORT
    scheme, sep, hostport = s.partition("://")
    if not sep:
        scheme, hostport = "http", s
        if s == "ollama.com":
            scheme, hostport = "https", "ollama.com:443"
    elif scheme == "http":
        default_port = 80
    elif scheme == "https":
        default_port = 443
    hostport, _, path = hostport.partition("/")
    host, port_text = _split_host_port(hostport)
    if host is None:
        host, port_text = "127.0.0.1", ""
        bare = hostport.strip("[]")
        if bare:
            host = bare
    try:
        port = int(port_text) if port_text else default_port
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        port = default_port
    return HostURL(scheme, host, port, path.strip("/"))


def _split_host_port(hostport: str) -> tuple[str | None, str]:
    """Go's net.SplitHostPort: (None, "") when there is no port."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or not hostport[end + 1 :].startswith(":"):
            return None, ""
        return hostport[1:end], hostport[end + 2 :]
    if hostport.count(":") != 1:
        return None, ""
    host, _, port = hostport.partition(":")
    return host, port


def host() -> HostURL:
    """HERD_HOST, else OLLAMA_HOST, else http://127.0.0.1:11434."""
    return parse_host(_get("HERD_HOST") or _get("OLLAMA_HOST"))


def origins() -> list[str]:
    """Extra CORS origins, comma-separated: HERD_ORIGINS, else OLLAMA_ORIGINS."""
    value = _get("HERD_ORIGINS") or _get("OLLAMA_ORIGINS")
    return [o.strip() for o in value.split(",") if o.strip()]


def api_key() -> str:
    """When set, every route but `/` requires `Authorization: Bearer <key>`. HERD_API_KEY."""
    return _get("HERD_API_KEY")


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration in seconds ("5m", "1h30m", "-1s", "0"); ValueError if bad."""
    s = text.strip()
    sign = -1.0 if s.startswith("-") else 1.0
    body = s.lstrip("+-")
    if body == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(body):
        m = _DURATION.match(body, pos)
        if m is None:
            raise ValueError(f"time: invalid duration {text!r}")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not body:
        raise ValueError(f"time: invalid duration {text!r}")
    return sign * total


def _seconds(names: tuple[str, ...], default: float) -> float:
    """An int number of seconds or a Go duration; negative means forever (inf)."""
    value = next((v for v in (_get(n) for n in names) if v), "")
    if not value:
        return default
    try:
        seconds = float(int(value))
    except ValueError:
        try:
            seconds = parse_duration(value)
        except ValueError:
            return default
    return math.inf if seconds < 0 else seconds


def keep_alive() -> float:
    """Seconds a model stays loaded after its last use: HERD_KEEP_ALIVE, else
    OLLAMA_KEEP_ALIVE (default 5m; negative = forever, returned as inf)."""
    return _seconds(("HERD_KEEP_ALIVE", "OLLAMA_KEEP_ALIVE"), 300.0)


def load_timeout() -> float:
    """Seconds a runner may take to load before it is given up: HERD_LOAD_TIMEOUT (5m)."""
    value = _seconds(("HERD_LOAD_TIMEOUT", "OLLAMA_LOAD_TIMEOUT"), 300.0)
    return math.inf if value <= 0 else value


def _int(names: tuple[str, ...], default: int) -> int:
    value = next((v for v in (_get(n) for n in names) if v), "")
    try:
        return int(value) if value else default
    except ValueError:
        return default


def max_loaded_models() -> int:
    """Most models loaded at once (HERD_MAX_LOADED_MODELS; 0 = auto: 3)."""
    n = _int(("HERD_MAX_LOADED_MODELS", "OLLAMA_MAX_LOADED_MODELS"), 0)
    return n if n > 0 else 3


def max_queue() -> int:
    """Requests allowed to wait for a model (HERD_MAX_QUEUE, default 512); then 503."""
    return max(1, _int(("HERD_MAX_QUEUE", "OLLAMA_MAX_QUEUE"), 512))


def num_parallel() -> int:
    """Sequences one loaded model serves at once (HERD_NUM_PARALLEL, default 4)."""
    return max(1, _int(("HERD_NUM_PARALLEL", "OLLAMA_NUM_PARALLEL"), 4))


def prompt_cache() -> int:
    """Bytes of host memory a loaded model keeps prompts that left its slots in
    (HERD_PROMPT_CACHE, e.g. 512MiB; default 1GiB; 0 turns it off): llama-server's
    --cache-ram."""
    value = _get("HERD_PROMPT_CACHE")
    size = _size(value) if value else None
    return 2**30 if size is None else size


def shared_prefix() -> bool:
    """Slots take a prefix another slot holds as its cells, one copy for all of them
    (HERD_SHARED_PREFIX=1), instead of copying its rows into their own. Off by default
    until it serves at least as well as the copies do (README, "Serving"). Read as
    `flash_attention` reads a bool: unset, 0, f and false are off, any other value on."""
    return _get("HERD_SHARED_PREFIX").lower() not in ("", "0", "f", "false")


def memory_limit() -> int | None:
    """Bytes runners may use in all (HERD_MEMORY_LIMIT, e.g. 8GiB); None: what is free."""
    return _size(_get("HERD_MEMORY_LIMIT"))


def image_limits() -> dict[str, int]:
    """The limits on an image in a request that are set: HERD_MAX_IMAGE_SIZE (its file,
    e.g. 20MiB) as `max_bytes`, HERD_MAX_IMAGE_PIXELS (width x height) as `max_pixels`
    (`herd.models.imageproc.ImageLimits` has the defaults)."""
    out = {}
    size = _size(_get("HERD_MAX_IMAGE_SIZE"))
    if size:
        out["max_bytes"] = size
    pixels = _int(("HERD_MAX_IMAGE_PIXELS",), 0)
    if pixels > 0:
        out["max_pixels"] = pixels
    return out


def _size(value: str) -> int | None:
    """A size in bytes with an optional unit (KB, MiB, G, ...); None when unreadable."""
    if not value:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?", value.lower())
    if m is None:
        return None
    unit = (m.group(2) or "b").rstrip("b") or "b"
    scale = {
        "b": 1,
        "k": 10**3,
        "m": 10**6,
        "g": 10**9,
        "t": 10**12,
        "ki": 2**10,
        "mi": 2**20,
        "gi": 2**30,
        "ti": 2**40,
    }.get(unit)
    return int(float(m.group(1)) * scale) if scale else None


def log_dir() -> Path:
    """Where a background `herd serve` (started by `herd run`) writes server.log."""
    return Path.home() / ".herd" / "logs"


def package_index() -> str:
    """The package index the built-in catalog's wheels come from (a PEP 503/691 "simple"
    index): HERD_PYPI_URL, else pip's PIP_INDEX_URL, else PyPI's."""
    return _get("HERD_PYPI_URL") or _get("PIP_INDEX_URL") or "https://pypi.org/simple/"
