"""What keeps one request from taking a model away from everyone.

- `check_tokens`: token ids from a request are checked against the vocabulary before they
  reach a backend (ggml's row lookup aborts the whole process on an id out of range).
- `request_error`: the typed error a request ends with when serving it raised (a HerdError as
  it is; anything else, a bug, as a RunnerError naming it).
- `Watchdog`: the runner process's liveness thread. Every `interval` seconds it checks the
  engine: its batch thread alive, and no batch step running longer than `step_limit`.
  While both hold it sends a heartbeat line (the server fails the requests of a runner it
  has not heard from for a while, see `herd.server.runner_process`); when either fails it
  logs why and ends the process, so the server starts a new runner for the next request
  instead of queueing requests on an engine that will never answer them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from herd.errors import HerdError, InvalidTokenError, RunnerError

log = logging.getLogger("herd.runner")

HEARTBEAT_S = 1.0  # how often a healthy runner says so
# a batch step (num_batch prompt tokens or one decode step of every sequence) running
# longer than this is stuck: the largest models on slow CPUs take minutes, not half an hour
STEP_LIMIT_S = 1800.0
EXIT_ENGINE_DEAD = 70  # the runner's exit code when its watchdog ends it (EX_SOFTWARE)


def check_tokens(
    tokens: Sequence[int], n_vocab: int, what: str = "prompt", skip: Sequence[range] = ()
) -> None:
    """InvalidTokenError unless every id is an int in [0, n_vocab); positions in `skip`
    (an image's placeholders, replaced before the backend sees them) are not checked."""
    if not skip:  # the usual case in one vectorized pass (a prompt may be 100k tokens)
        ids = np.asarray(tokens)
        if ids.dtype.kind in "iu" and (ids.size == 0 or (ids.min() >= 0 and ids.max() < n_vocab)):
            return
    for i, token in enumerate(tokens):  # which one, for the message
        if (
            isinstance(token, int | np.integer)
            and not isinstance(token, bool)
            and 0 <= token < n_vocab
        ):
            continue
        if any(i in span for span in skip):
            continue
        raise InvalidTokenError(
            f"{what}: token id {token!r} at position {i} is not in the model's vocabulary "
            f"(0 to {n_vocab - 1})"
        )


def request_error(e: BaseException) -> HerdError:
    """The error a request ends with when serving it raised `e`."""
    if isinstance(e, HerdError):
        return e
    log.error("a request failed in the engine", exc_info=e)
    return RunnerError(f"runner error: {type(e).__name__}: {e}")


class Engine(Protocol):
    """What the watchdog watches (`herd.runner.Runner`)."""

    @property
    def failure(self) -> BaseException | None:
        """What ended the batch thread, None while it runs."""
        ...

    @property
    def step_started(self) -> float | None:
        """time.monotonic() when the running batch step began; None between steps."""
        ...


class Watchdog:
    """The runner process's liveness thread (see the module docstring). `send` writes a
    line to the server; `exit` ends the process (os._exit; tests pass their own)."""

    def __init__(
        self,
        engine: Engine | None,
        send: Callable[[dict[str, object]], None],
        exit: Callable[[int], None],
        interval: float = HEARTBEAT_S,
        step_limit: float = STEP_LIMIT_S,
    ) -> None:
        self.engine, self.send, self.exit = engine, send, exit
        self.interval, self.step_limit = interval, step_limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="herd-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def problem(self) -> str | None:
        """Why the engine cannot serve any more requests, None while it can."""
        engine = self.engine
        if engine is None:  # an embedding model: requests run on their own threads
            return None
        if engine.failure is not None:
            return f"the engine's batch thread died: {engine.failure!r}"
        started = engine.step_started
        if started is not None and time.monotonic() - started > self.step_limit:
            return f"a batch step has run for more than {self.step_limit:g}s"
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            problem = self.problem()
            if problem is not None:
                log.error("%s; the runner exits so that the server starts a new one", problem)
                self.exit(EXIT_ENGINE_DEAD)
                return
            try:
                self.send({"op": "alive"})
            except (OSError, ValueError):  # the server is gone: stdin's end will stop us
                return
