"""The server's end of the pipe to one runner child process (`python -m herd.runner.serve`;
its docstring has the protocol): start with a `load`, one queue of replies per request id,
cancellation when a request's reader goes away, and every request in flight failed with a
RunnerError when the process dies.

Liveness: a runner sends a heartbeat line every second while its engine can serve
(`herd.runner.faults.Watchdog`; it exits when its engine cannot). A runner that sends no
line at all for `SILENCE_S` seconds while requests wait on it (frozen, swapped out, stuck
with its heartbeat thread) is killed, and those requests fail with a RunnerError saying
so; the next request starts a new runner. No request waits on a runner forever."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from herd.errors import RunnerError, error_from_name

log = logging.getLogger("herd.server")

SILENCE_S = 30.0  # a runner this long without a line while requests wait on it is killed


class RunnerProcess:
    """The server's end of the pipe to one `python -m herd.runner.serve`."""

    def __init__(
        self,
        name: str,
        on_exit: Callable[[RunnerProcess], None],
        silence_s: float | None = None,
    ) -> None:
        self.name, self.on_exit = name, on_exit
        self.silence_s = SILENCE_S if silence_s is None else silence_s
        self.last_heard = time.monotonic()
        self.monitor: asyncio.Task[None] | None = None
        self.why: str | None = None  # why the server ended the process, for its requests
        self.proc: asyncio.subprocess.Process | None = None
        self.streams: dict[int, asyncio.Queue[Any]] = {}
        self.ids = itertools.count(1)
        self.reader: asyncio.Task[None] | None = None
        self.alive = False
        self.stopping = False
        self.ready: dict[str, Any] = {}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self, load: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "herd.runner.serve",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 28,
        )
        self._write({"op": "load", **load})
        try:
            line = await asyncio.wait_for(
                self._readline(), None if math.isinf(timeout) else timeout
            )
        except TimeoutError:
            await self.kill()
            raise RunnerError(
                f"timed out loading '{self.name}' after {timeout:g}s (HERD_LOAD_TIMEOUT)"
            ) from None
        except BaseException:
            await self.kill()
            raise
        if not line:
            code = await self.proc.wait()
            raise RunnerError(
                f"model runner for '{self.name}' exited while loading "
                f"(exit code {code}); see the server log for details"
            )
        msg = json.loads(line)
        if msg.get("op") != "ready":
            await self.kill()
            raise error_from_name(str(msg.get("type", "")), str(msg.get("error", "load failed")))
        self.ready, self.alive = msg, True
        self.last_heard = time.monotonic()
        self.reader = asyncio.create_task(self._read())
        self.monitor = asyncio.create_task(self._monitor())
        return msg

    async def _readline(self) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        return await self.proc.stdout.readline()

    async def _read(self) -> None:
        try:
            while line := await self._readline():
                self.last_heard = time.monotonic()
                try:
                    msg = json.loads(line)
                    queue = self.streams.get(msg.get("id"))
                except (ValueError, AttributeError, TypeError):  # not the protocol: skipped
                    log.error("runner for %s sent a malformed line: %.200r", self.name, line)
                    continue
                if queue is not None:
                    queue.put_nowait(msg)
        finally:
            self.alive = False
            code = self.proc.returncode if self.proc is not None else None
            if not self.stopping:
                log.error("runner for %s stopped unexpectedly (exit code %s)", self.name, code)
            error = RunnerError(
                self.why
                or "model runner has unexpectedly stopped, this may be due to resource "
                "limitations or an internal error, check the herd server log for details"
            )
            for queue in self.streams.values():
                queue.put_nowait(error)
            self.on_exit(self)

    async def _monitor(self) -> None:
        """Kill the process once it has been silent for `silence_s` with requests waiting."""
        while self.alive:
            await asyncio.sleep(min(1.0, self.silence_s / 4))
            silent = time.monotonic() - self.last_heard
            if self.alive and self.streams and silent > self.silence_s:
                log.error(
                    "runner for %s has sent nothing for %.0fs with %d requests waiting; "
                    "killing it (pid %s)",
                    self.name,
                    silent,
                    len(self.streams),
                    self.pid,
                )
                self.why = (
                    f"model runner stopped responding (nothing for {self.silence_s:g}s) and "
                    "was stopped; the next request starts a new one"
                )
                await self.kill()
                return

    def _write(self, msg: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        if not self.proc.stdin.is_closing():
            self.proc.stdin.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    async def request(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Send one request; yield its replies up to the last. Closing early cancels it."""
        if not self.alive:
            raise RunnerError(f"model runner for '{self.name}' is not running")
        rid = next(self.ids)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.streams[rid] = queue
        finished = False
        try:
            self._write({**payload, "id": rid})
            while True:
                msg = await queue.get()
                if isinstance(msg, BaseException):
                    finished = True
                    raise msg
                if "error" in msg:
                    finished = True
                    raise error_from_name(str(msg.get("type", "")), str(msg["error"]))
                finished = bool(msg.get("done")) or "embeddings" in msg or "results" in msg
                yield msg
                if finished:
                    return
        finally:
            # synchronous on purpose: this runs while the request task is being cancelled
            self.streams.pop(rid, None)
            if not finished and self.alive:
                self._write({"op": "cancel", "id": rid})

    async def stop(self, timeout: float = 5.0) -> None:
        """End the process: close its stdin (it exits), kill it if it does not."""
        self.stopping = True
        if self.proc is None:
            return
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                await self.kill()
        if self.reader is not None:
            with contextlib.suppress(Exception):
                await self.reader
        if self.monitor is not None:
            self.monitor.cancel()

    async def kill(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
