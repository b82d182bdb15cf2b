"""HTTP to an OCI distribution registry, as Ollama's `makeRequestWithRetry` does it.

One `Client` per pull or push: it picks the scheme (https; http only with `insecure`),
answers one 401 per request with a bearer token fetched from the challenge's realm, turns
404/4xx/5xx into typed errors that name the registry, and follows redirects itself so
that it can refuse the ones Ollama would not follow (another host, https -> http) and stop
at a loop. Every response is streamed and every body it reads is bounded (`read_limited`):
a registry can make herd wait or retry a stated number of times, never read without end.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import httpx

from herd import __version__
from herd.errors import ModelNotFoundError, RegistryError
from herd.registry import auth
from herd.store.names import Name

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MAX_REDIRECTS = 10
MAX_MANIFEST = 4 << 20  # the OCI distribution spec lets registries refuse larger manifests
MAX_BODY = 64 << 10  # any other body herd reads (tokens, errors, upload answers)
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
USER_AGENT = (
    f"herd/{__version__} ({platform.machine()} {platform.system().lower()}) "
    f"Python/{platform.python_version()}"
)

Body = Callable[[], Iterable[bytes]] | bytes | None  # a factory, so a retry can resend


@dataclass
class Options:
    """How to talk to a registry (the `--insecure` flag, test knobs for transfers)."""

    insecure: bool = False
    timeout: float = 30.0  # seconds without a byte before a part counts as stalled
    max_retries: int = 6  # attempts per part (like Ollama) and per manifest or HEAD request
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    min_rate: float = 1024.0  # bytes/s a transfer must average over `rate_window`...
    rate_window: float = 60.0  # ...seconds, or it counts as stalled (a slow drip) and retries
    digest_retries: int = 1  # downloads of a blob whose bytes had the wrong sha256, after the first
    max_blob: int = 1 << 40  # bytes (1 TiB): a larger size from a manifest or HEAD is refused
    part_min: int = 100 * 1000 * 1000  # Ollama: size/16 clamped to [100 MB, 1000 MB]
    part_max: int = 1000 * 1000 * 1000
    parts: int = 16
    transport: httpx.BaseTransport | None = field(default=None, repr=False)


class TransientError(RegistryError):
    """A failure worth a retry: a timeout, a cut connection, a 5xx, 408 or 429."""


class Client:
    def __init__(self, name: Name, options: Options | None = None) -> None:
        self.name = name
        self.options = options or Options()
        if name.scheme == "http" and not self.options.insecure:
            raise RegistryError(
                f"insecure protocol http for {name.host}: pass --insecure to "
                "use a plain-HTTP registry"
            )
        scheme = "http" if self.options.insecure else (name.scheme or "https")
        self.base = httpx.URL(f"{scheme}://{name.host}")
        self.repo = f"{name.namespace}/{name.model}"
        self.token: str | None = None
        self._lock = threading.Lock()
        self.http = httpx.Client(
            timeout=httpx.Timeout(self.options.timeout, connect=self.options.timeout),
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            transport=self.options.transport,
            trust_env=True,
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ---- URLs
    def url(self, *parts: str) -> httpx.URL:
        return self.base.join("/v2/" + self.repo + "/" + "/".join(parts))

    @property
    def host(self) -> str:
        return self.name.host

    # ---- requests
    def request(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        headers: dict[str, str] | None = None,
        body: Body = None,
        what: str = "",
        cross_host: bool = False,
        attempts: int = 1,
    ) -> httpx.Response:
        """Send with auth; 401 -> token -> one retry. Errors become RegistryError (404 ->
        ModelNotFoundError when `what` names a manifest). With `cross_host`, a redirect to
        another host is returned (not followed) for the caller to use, as Ollama does with
        the CDN URL of a blob; otherwise it is an error. A TransientError is tried again up
        to `attempts` times in all, with backoff. The response is streamed: close it."""
        for attempt in range(1, attempts + 1):
            try:
                return self._request(method, url, headers, body, what, cross_host)
            except TransientError:
                if attempt >= attempts:
                    raise
            time.sleep(self.options.backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable")  # the loop returns or raises

    def _request(
        self,
        method: str,
        url: httpx.URL | str,
        headers: dict[str, str] | None,
        body: Body,
        what: str,
        cross_host: bool,
    ) -> httpx.Response:
        url = httpx.URL(str(url))
        for attempt in range(2):
            resp = self._send(method, url, headers, body, cross_host)
            if resp.status_code != 401:
                break
            resp.close()
            if attempt == 1:
                raise RegistryError(
                    f"unauthorized: {self.host} refused {method} {url.path} "
                    "(access denied" + (" even with a token)" if self.token else ")"),
                    401,
                )
            challenge = resp.headers.get("www-authenticate", "")
            self.token = auth.fetch_token(self.http, challenge, url, self.options.insecure)
        if resp.status_code >= 400:
            text = self.body_text(resp)
            resp.close()
            if resp.status_code == 404:
                if what.startswith("manifest"):
                    raise ModelNotFoundError(
                        f"model '{self.name.display_shortest()}' not found in registry {self.host}"
                    )
                raise RegistryError(
                    f"{what or url.path} not found in {self.repo} at "
                    f"{self.host}{': ' + text if text else ''}",
                    404,
                )
            error = TransientError if resp.status_code in RETRY_STATUSES else RegistryError
            raise error(
                f"registry {self.host} answered {resp.status_code} "
                f"{resp.reason_phrase} to {method} {url.path}"
                f"{': ' + text if text else ''}",
                resp.status_code,
            )
        return resp

    def _send(
        self,
        method: str,
        url: httpx.URL,
        headers: dict[str, str] | None,
        body: Body,
        cross_host: bool,
    ) -> httpx.Response:
        seen: set[str] = set()
        for _ in range(MAX_REDIRECTS + 1):
            if str(url) in seen:
                raise RegistryError(
                    f"registry {self.host}: redirect loop on {method} {url.path} "
                    f"(it redirects back to {url})"
                )
            seen.add(str(url))
            hdrs = dict(headers or {})
            if self.token and url.host == self.base.host:
                hdrs["Authorization"] = f"Bearer {self.token}"
            content = body() if callable(body) else body
            try:
                req = self.http.build_request(method, url, headers=hdrs, content=content)
                resp = self.http.send(req, stream=True)
            except httpx.TimeoutException as e:
                raise TransientError(
                    f"registry {self.host} timed out on {method} {url.path}: {type(e).__name__}"
                ) from e
            except httpx.HTTPError as e:
                hint = (
                    "; if it is a plain-HTTP registry, pass --insecure"
                    if url.scheme == "https" and "SSL" in str(e)
                    else ""
                )
                transient = isinstance(e, httpx.ReadError | httpx.RemoteProtocolError)
                error = TransientError if transient else RegistryError
                raise error(f"cannot reach registry {self.host} ({url.scheme}): {e}{hint}") from e
            if resp.status_code not in (301, 302, 303, 307, 308) or "location" not in resp.headers:
                return resp
            target = url.join(resp.headers["location"])
            if target.host != url.host:
                if cross_host:
                    return resp
                resp.close()
                raise RegistryError(
                    f"registry {self.host} redirected {method} {url.path} to "
                    f"another host ({target.host}); herd follows redirects "
                    "only within the registry",
                    resp.status_code,
                )
            if url.scheme == "https" and target.scheme != "https" and not self.options.insecure:
                resp.close()
                raise RegistryError(
                    f"registry {self.host} redirected to plain http "
                    f"({target}); pass --insecure to allow it"
                )
            resp.close()
            if resp.status_code == 303:
                method, body = "GET", None
            url = target
        raise RegistryError(
            f"registry {self.host}: more than {MAX_REDIRECTS} redirects for {url.path}"
        )

    def read_limited(self, resp: httpx.Response, limit: int, what: str) -> bytes:
        """The body of a streamed response, refused beyond `limit` bytes or below the
        minimum rate (a registry that drips a manifest is as stuck as a silent one)."""
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            resp.close()
            raise RegistryError(
                f"registry {self.host} sent {what} of {declared} bytes; herd reads at most {limit}"
            )
        data = bytearray()
        meter = RateMeter(self.options.min_rate, self.options.rate_window)
        try:
            for chunk in resp.iter_bytes():
                data += chunk
                if len(data) > limit:
                    raise RegistryError(
                        f"registry {self.host} sent {what} longer than {limit} bytes"
                    )
                if meter.slow(len(chunk)):
                    raise TransientError(f"registry {self.host} sent {what} too slowly ({meter})")
        except httpx.TimeoutException as e:
            raise TransientError(f"registry {self.host} stalled while sending {what}") from e
        except httpx.HTTPError as e:
            raise TransientError(f"registry {self.host} cut {what} short: {e}") from e
        finally:
            resp.close()
        return bytes(data)

    def body_text(self, resp: httpx.Response) -> str:
        """At most 300 characters of an error body, for a message (never raises)."""
        data = bytearray()
        try:
            for chunk in resp.iter_raw():
                data += chunk
                if len(data) >= 300:
                    break
        except httpx.HTTPError:
            pass
        text = bytes(data[:300]).decode("utf-8", errors="replace").strip()
        return " ".join(text.split())


class RateMeter:
    """Bytes over a sliding window: `slow(n)` is True once a whole window averaged less
    than `min_rate` bytes per second."""

    def __init__(self, min_rate: float, window: float) -> None:
        self.min_rate, self.window = min_rate, window
        self.start, self.bytes, self.rate = time.monotonic(), 0, 0.0

    def slow(self, n: int) -> bool:
        self.bytes += n
        elapsed = time.monotonic() - self.start
        if elapsed < self.window:
            return False
        self.rate = self.bytes / elapsed
        self.start, self.bytes = time.monotonic(), 0
        return self.rate < self.min_rate

    def __str__(self) -> str:
        return f"{self.rate:.0f} B/s, below the minimum of {self.min_rate:.0f} B/s"


def file_slices(
    path: str,
    offset: int,
    size: int,
    chunk: int = 1 << 20,
    on_bytes: Callable[[int], None] | None = None,
) -> Callable[[], Iterator[bytes]]:
    """A body factory that streams `size` bytes of `path` from `offset` (re-readable)."""

    def gen() -> Iterator[bytes]:
        with open(path, "rb") as f:
            f.seek(offset)
            left = size
            while left > 0:
                data = f.read(min(chunk, left))
                if not data:
                    raise RegistryError(f"{path} shrank while being uploaded")
                left -= len(data)
                if on_bytes:
                    on_bytes(len(data))
                yield data

    return gen
