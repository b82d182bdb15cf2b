"""Every ggml graph of a process is computed on one thread.

ggml's CPU backend runs a graph as an OpenMP parallel region, and libgomp keeps a team of
worker threads for each thread that starts one. Once a second thread has started a region
(a request's thread encoding its image, a library caller computing before it starts a
runner thread), libgomp manages more threads than the machine has CPUs, and then it stops
spinning at barriers and sleeps instead (GOMP_SPINCOUNT's documented throttle; nothing
turns it off). ggml waits at a barrier after every op, so on a 2-core VM with 2 threads a
SmolLM2 decode step took 14.4 ms instead of 7.1 once the main thread had run one graph and
the runner's thread ran the rest. So each compute call is handed to one long-lived thread,
which is then the only one that ever starts a region: its team stays warm, and no other is
made. The handoff costs two thread switches (tens of microseconds a graph).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# a job: the call, where its (result, error) goes, and the lock its caller waits on. A
# one-worker ThreadPoolExecutor does the same with a Future per call: 51 us a handoff
# against 21-45 for this queue and lock, on every decode step
_Job = tuple[Callable[[], object], list[tuple[object, BaseException | None]], threading.Lock]
_jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
_thread: threading.Thread | None = None
_start = threading.Lock()


def _serve() -> None:
    while True:
        fn, box, done = _jobs.get()
        try:
            box.append((fn(), None))
        except BaseException as e:  # the caller raises it
            box.append((None, e))
        finally:
            done.release()


def run(fn: Callable[[], T]) -> T:
    """fn() on the process's compute thread, its result or exception returned here; inline
    when called from that thread."""
    global _thread
    if threading.current_thread() is _thread:
        return fn()
    if _thread is None:
        with _start:
            if _thread is None:
                t = threading.Thread(target=_serve, name="herd-ggml-compute", daemon=True)
                t.start()
                _thread = t
    done = threading.Lock()
    done.acquire()
    box: list[tuple[object, BaseException | None]] = []
    _jobs.put((fn, box, done))
    done.acquire()  # released by the compute thread once fn has returned or raised
    result, error = box[0]
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def compute_thread() -> threading.Thread | None:
    """The thread computing every graph, once one has run (for tests)."""
    return _thread


def _after_fork() -> None:
    # a forked child has only the thread that forked: it starts its own compute thread
    global _thread, _jobs
    _thread, _jobs = None, queue.SimpleQueue()


os.register_at_fork(after_in_child=_after_fork)
