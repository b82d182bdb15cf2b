"""The parts of one blob download: their saved state (Ollama's `-partial-N` JSON files),
their plan, and the threads that fetch them with `Range` requests.

Every size is bounded before anything is allocated: a blob is at most `Options.max_blob`
bytes and at most MAX_PARTS parts. Each part is tried `max_retries` times with backoff;
only a failure worth a retry (a timeout, a cut or too slow body, a 5xx) is tried again. A
`stop` event ends every part at its next chunk or backoff: one part's fatal error, Ctrl-C in
the caller, or a server-side pull whose client left.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from herd.errors import DownloadError, RegistryError
from herd.registry.client import Client, Options, RateMeter, TransientError

MAX_PARTS = 2048  # a 1 TiB blob in parts of 1000 MB is ~1100 of them
_SAVE_EVERY = 8 << 20  # persist part state at least this often (bytes)
_GRACE_S = 2.0  # how long an interrupted download waits for its parts to save their state


class RangeRefused(RegistryError):
    """416: the registry will not serve the range (its blob is not the size we planned)."""


class Stopped(Exception):
    """The download was stopped from outside the part (another part failed, Ctrl-C)."""


@dataclass
class Part:
    n: int
    offset: int
    size: int
    completed: int = 0

    def to_json(self) -> bytes:
        # Ollama's jsonBlobDownloadPart, as json.Encoder writes it
        return (
            json.dumps(
                {
                    "N": self.n,
                    "Offset": self.offset,
                    "Size": self.size,
                    "Completed": self.completed,
                },
                separators=(",", ":"),
            ).encode()
            + b"\n"
        )


def state_path(partial: Path, part: Part) -> Path:
    return Path(f"{partial}-{part.n}")


def write_part(path: Path, part: Part) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(part.to_json())
    os.replace(tmp, path)


def read_parts(partial: Path, total: int | None) -> list[Part] | None:
    """Saved part states, or None when absent, too many, or not a consistent set covering
    `total` bytes (when known): then the blob starts over."""
    files = [
        p for p in partial.parent.glob(partial.name + "-*") if p.name.rsplit("-", 1)[-1].isdigit()
    ]
    if not files or len(files) > MAX_PARTS:
        return None
    parts = []
    try:
        for p in files:
            obj = json.loads(p.read_bytes())
            parts.append(
                Part(int(obj["N"]), int(obj["Offset"]), int(obj["Size"]), int(obj["Completed"]))
            )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    parts.sort(key=lambda x: x.offset)
    offset = 0
    for i, part in enumerate(parts):
        if part.n != i or part.offset != offset or not 0 <= part.completed <= part.size:
            return None
        offset += part.size
    if total is not None and offset != total:
        return None
    return parts


def remove_partial(partial: Path) -> None:
    for p in partial.parent.glob(partial.name + "*"):
        with contextlib.suppress(OSError):
            p.unlink()


def plan_parts(total: int, options: Options) -> list[Part]:
    """Ollama's plan (size/16 clamped to [part_min, part_max]), never over MAX_PARTS."""
    size = min(max(total // options.parts, options.part_min), options.part_max)
    size = max(size, -(-total // MAX_PARTS), 1)
    parts, offset = [], 0
    while offset < total:
        parts.append(Part(len(parts), offset, min(size, total - offset)))
        offset += parts[-1].size
    return parts


class Fetch:
    """What every part of one blob shares: where to GET, the open partial file, progress."""

    def __init__(
        self,
        client: Client,
        url: httpx.URL,
        with_auth: bool,
        f: IO[bytes],
        partial: Path,
        on_bytes: Callable[[int], None],
        what: str,
    ) -> None:
        self.client, self.url, self.with_auth, self.f = client, url, with_auth, f
        self.partial, self.on_bytes, self.what = partial, on_bytes, what
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.discarded = False  # the caller removes the partial file: save no more state

    def discard(self) -> None:
        self.stop.set()
        self.discarded = True

    def run(self, todo: list[Part]) -> None:
        """Fetch `todo` on up to `options.parts` threads. The first error (or Ctrl-C here)
        stops every part, waits briefly for them to save their state, and is raised."""
        jobs: queue.SimpleQueue[Part] = queue.SimpleQueue()
        for part in todo:
            jobs.put(part)
        results: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()

        def worker() -> None:
            while not self.stop.is_set():
                try:
                    part = jobs.get_nowait()
                except queue.Empty:
                    break
                try:
                    self._part(part)
                except BaseException as e:  # handed to the caller's thread
                    results.put(e)
                    return
                results.put(None)

        # daemon threads: a part stuck in a read must not keep Ctrl-C from ending the process
        threads = [
            threading.Thread(target=worker, daemon=True, name=f"herd-pull-{i}")
            for i in range(min(len(todo), self.client.options.parts))
        ]
        for t in threads:
            t.start()
        try:
            for _ in todo:
                error = results.get()
                if error is not None and not isinstance(error, Stopped):
                    raise error
        finally:
            self.stop.set()
            for t in threads:
                t.join(_GRACE_S / len(threads))
            with self.lock, contextlib.suppress(OSError, ValueError):
                self.f.flush()

    def _part(self, part: Part) -> None:
        options = self.client.options
        last: BaseException | None = None
        tries = 0
        while tries < options.max_retries:
            try:
                self._range(part)
                return
            except (TransientError, httpx.TransportError) as e:
                last = e
            finally:
                with self.lock, contextlib.suppress(ValueError):
                    self.f.flush()  # state on disk never claims bytes still in a buffer
                if not self.discarded:
                    write_part(state_path(self.partial, part), part)
            tries += 1
            if tries < options.max_retries and self.stop.wait(options.backoff * 2 ** (tries - 1)):
                raise Stopped
        raise DownloadError(
            f"{self.what}: part {part.n} failed after {tries} attempt(s): {last}; "
            "pull again to resume"
        ) from last

    def _range(self, part: Part) -> None:
        start, stop = part.offset + part.completed, part.offset + part.size - 1
        try:
            resp = self._get(start, stop)
            try:
                _check_range(resp, start, stop, part)
                self._copy(resp, part)
            finally:
                resp.close()
        except RegistryError as e:
            if e.status == 416:
                raise RangeRefused(str(e), 416) from None
            raise
        if part.completed < part.size:
            raise TransientError(
                f"connection closed after {part.completed} of {part.size} bytes of part {part.n}"
            )

    def _get(self, start: int, stop: int) -> httpx.Response:
        client, url = self.client, self.url
        headers = {"Range": f"bytes={start}-{stop}"}
        if self.with_auth:
            return client.request("GET", url, headers=headers, what="blob part")
        try:  # a CDN: no token, no redirects
            resp = client.http.send(
                client.http.build_request("GET", url, headers=headers), stream=True
            )
        except httpx.TimeoutException as e:
            raise TransientError(f"{url.host} timed out on a blob part") from e
        if resp.status_code >= 400:
            resp.close()
            kind = TransientError if resp.status_code >= 500 else RegistryError
            raise kind(f"{url.host} answered {resp.status_code} for a blob part", resp.status_code)
        return resp

    def _copy(self, resp: httpx.Response, part: Part) -> None:
        options = self.client.options
        meter = RateMeter(options.min_rate, options.rate_window)
        state = state_path(self.partial, part)
        unsaved = 0
        for chunk in resp.iter_raw():  # as received: a cut connection loses nothing
            if self.stop.is_set():
                raise Stopped
            chunk = chunk[: part.size - part.completed]
            if not chunk:
                break
            with self.lock:
                self.f.seek(part.offset + part.completed)
                self.f.write(chunk)
            part.completed += len(chunk)
            unsaved += len(chunk)
            self.on_bytes(len(chunk))
            if unsaved >= _SAVE_EVERY:
                with self.lock:
                    self.f.flush()
                write_part(state, part)
                unsaved = 0
            if meter.slow(len(chunk)):
                raise TransientError(f"part {part.n} arrives too slowly ({meter})")


def _check_range(resp: httpx.Response, start: int, stop: int, part: Part) -> None:
    """The answer must be the range asked for: its size, and where it starts."""
    want = stop - start + 1
    declared = resp.headers.get("content-length", "")
    length = int(declared) if declared.isdigit() else None
    host = resp.url.host
    if resp.status_code == 416:
        raise RegistryError(f"{host} refused the range bytes={start}-{stop} (416)", 416)
    if resp.status_code == 200 and start == 0 and length == part.size:
        return  # the whole part in one 200 is what a Range-less server sends: fine
    if resp.status_code != 206:
        raise RegistryError(
            f"{host} ignored the Range request (status {resp.status_code})", resp.status_code
        )
    if length is not None and length != want:
        raise RegistryError(
            f"{host} answered the range bytes={start}-{stop} ({want} bytes) with "
            f"Content-Length {declared}"
        )
    content_range = resp.headers.get("content-range", "")
    if content_range and not content_range.startswith(f"bytes {start}-"):
        raise RegistryError(
            f"{host} answered the range bytes={start}-{stop} with {content_range!r}"
        )
