"""Pull progress on stderr, drawn like Ollama's: status spinners and one bar per blob.

pulling manifest
pulling b179c9523d0e:  45% ▕███████         ▏  44 MB/ 98 MB  12 MB/s
verifying sha256 digest
writing manifest
success
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TaskID
from rich.text import Text

from herd.cli.format import human_bytes


class _OnlyBars(ProgressColumn):
    """Show a column for byte bars only; status lines have just their text."""

    def __init__(self, inner: ProgressColumn, bars: bool = True) -> None:
        super().__init__()
        self.inner, self.bars = inner, bars

    def render(self, task: Task) -> Text:
        if bool(task.fields.get("bar")) != self.bars:
            return Text("")
        return self.inner.render(task)  # type: ignore[return-value]


class _Percent(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{int(task.percentage):3d}%")


class _Bytes(ProgressColumn):
    def render(self, task: Task) -> Text:
        total = human_bytes(int(task.total or 0))
        if task.finished:
            return Text(total.rjust(7))
        return Text(f"{human_bytes(int(task.completed)).rjust(7)}/{total.rjust(7)}")


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if task.finished or not speed:
            return Text("")
        return Text(f"{human_bytes(int(speed))}/s")


class PullProgress:
    """A `progress(status, digest, total, completed)` callback that draws on stderr."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            _OnlyBars(SpinnerColumn(), bars=False),
            "{task.description}",
            _OnlyBars(_Percent()),
            _OnlyBars(BarColumn(bar_width=40)),
            _OnlyBars(_Bytes()),
            _OnlyBars(_Rate()),
            console=self.console,
            transient=False,
        )
        self.bars: dict[str, TaskID] = {}
        self.status: TaskID | None = None
        self.started = False

    def __call__(
        self, status: str, digest: str | None, total: int | None, completed: int | None
    ) -> None:
        if not self.started:  # draw nothing unless something is pulled
            self.progress.start()
            self.started = True
        if digest and total:
            task = self.bars.get(digest)
            if task is None:
                if not completed:
                    return  # like Ollama: no bar until bytes move (or the blob is there)
                self._stop_status()
                task = self.bars[digest] = self.progress.add_task(
                    f"{status}:", total=total, bar=True
                )
            self.progress.update(task, completed=completed or 0, total=total)
            return
        self._stop_status()
        self.status = self.progress.add_task(status, total=1, bar=False)
        if status == "success":
            self._stop_status()

    def _stop_status(self) -> None:
        if self.status is not None:
            self.progress.update(self.status, completed=1)
            self.status = None

    def close(self) -> None:
        if self.started:
            self._stop_status()
            self.progress.stop()
            self.started = False

    def __enter__(self) -> PullProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
