"""Which models are loaded, in which runner processes, for how long.

A model loads on first use into its own runner child process (`herd.runner.serve`, see
its docstring for the pipe protocol) and stays for `keep_alive` after its last request
(every request sets that duration; 0 unloads as soon as the model is idle; negative keeps
it forever). At most `max_loaded` models are loaded and at most `max_queue` requests wait
(then QueueFullError, 503). Before a load, the model's weights + KV cache + compute
buffers must fit in the memory left: idle models are evicted, shortest keep-alive first;
if it can never fit, InsufficientMemoryError names the sizes (`herd.ml.layout.estimate`,
the numbers the backend's own fit check lays out). A request whose load-time options
(`Options.load_key`: num_ctx, num_batch, num_gpu, ...) differ from the loaded runner's,
or a model re-pulled or re-created with new content (its projector file included),
reloads the runner once it is idle. A runner that
dies fails its requests in flight (RunnerError, 500); requests queued for one of its slots
and the next requests go to a new one.

All of it runs on the server's event loop; the only blocking work (the runner's compute)
happens in the child processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

from herd.errors import InsufficientMemoryError, QueueFullError
from herd.server.loadspec import LoadSpec, estimate_memory, load_message
from herd.server.runner_process import RunnerProcess

log = logging.getLogger("herd.server")

FOREVER_S = 2**63 / 1e9  # Ollama's "forever": time.Duration(math.MaxInt64)


# ---- the loaded models --------------------------------------------------------------------
@dataclass
class Runner:
    """A loaded model."""

    spec: LoadSpec
    proc: RunnerProcess
    estimate: int
    parallel: int
    slots: asyncio.Semaphore
    session: float = 300.0  # seconds of keep-alive after the last request; inf = forever
    refcount: int = 0
    running: int = 0
    expires_at: float = 0.0  # epoch seconds
    timer: asyncio.TimerHandle | None = None
    kv_usage: float = 0.0
    load_duration: int = 0  # ns
    loaded_at: float = field(default_factory=time.time)
    # the runner's ready message: backend, device ("cpu"/"gpu"), device_name
    processor: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def usable_for(self, spec: LoadSpec) -> bool:
        return (
            self.proc.alive
            and self.spec.ref.digest == spec.ref.digest
            and self.spec.ref.projector == spec.ref.projector  # Ollama's needsReload
            and self.spec.options.load_key() == spec.options.load_key()
        )


class Lease:
    """A request's hold on a runner slot; `release()` (idempotent, synchronous) gives it back."""

    def __init__(self, scheduler: Scheduler, runner: Runner, load_duration: int) -> None:
        self.scheduler, self.runner, self.load_duration = scheduler, runner, load_duration
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.runner.slots.release()
            self.runner.running -= 1
            self.scheduler._release(self.runner)


class Scheduler:
    def __init__(
        self,
        *,
        max_loaded: int,
        max_queue: int,
        keep_alive: float,
        load_timeout: float,
        memory_limit: int | None,
        num_parallel: int,
        backend: str | None = None,
        kv_cache_type: str = "f16",
    ) -> None:
        self.max_loaded, self.max_queue = max_loaded, max_queue
        self.default_keep_alive, self.load_timeout = keep_alive, load_timeout
        self.memory_limit, self.num_parallel, self.backend = memory_limit, num_parallel, backend
        self.kv_cache_type = kv_cache_type  # HERD_KV_CACHE_TYPE: the runners read it too
        self.runners: dict[str, Runner] = {}
        self.waiting: dict[str, int] = {}
        self.pending = 0
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()  # unloads in flight (kept referenced)

    # ---- requests
    async def lease(self, spec: LoadSpec, keep_alive: float | None) -> Lease:
        """A slot on the runner for `spec`, loading it first if needed (QueueFullError when
        too many requests wait already)."""
        if self.pending >= self.max_queue:
            raise QueueFullError()
        self.pending += 1
        self.waiting[spec.name] = self.waiting.get(spec.name, 0) + 1
        try:
            while True:
                runner, load_ns = await self._runner_for(spec, keep_alive)
                try:
                    await runner.slots.acquire()
                except BaseException:
                    self._release(runner)
                    raise
                if runner.proc.alive:
                    break
                # it died while this request queued for a slot: the next round starts a
                # new runner instead of failing a request the dead one never saw
                runner.slots.release()
                self._release(runner)
        finally:
            self.pending -= 1
            self.waiting[spec.name] -= 1
            if not self.waiting[spec.name]:
                del self.waiting[spec.name]
        runner.running += 1
        return Lease(self, runner, load_ns)

    async def load_only(self, spec: LoadSpec, keep_alive: float | None) -> int:
        """Load (or keep) the model without running anything; returns the load time in ns."""
        lease = await self.lease(spec, keep_alive)
        lease.release()
        return lease.load_duration

    async def expire(self, name: str) -> None:
        """keep_alive 0 without a prompt: unload now, or as soon as the model is idle."""
        runner = self.runners.get(name)
        if runner is None:
            return
        runner.session = 0.0
        if runner.refcount == 0:
            await self._unload(runner)

    # ---- state for /api/ps and /metrics
    def loaded(self) -> list[Runner]:
        return sorted(self.runners.values(), key=lambda r: r.expires_at, reverse=True)

    def gauges(self) -> dict[str, dict[str, float]]:
        names = set(self.runners) | set(self.waiting)
        out = {}
        for name in names:
            r = self.runners.get(name)
            out[name] = {
                "running": float(r.running if r else 0),
                "waiting": float(self.waiting.get(name, 0)),
                "kv": r.kv_usage if r else 0.0,
            }
        return out

    async def shutdown(self) -> None:
        for runner in list(self.runners.values()):
            await self._unload(runner)

    # ---- internals
    def _spawn_unload(self, runner: Runner) -> None:
        task = asyncio.get_running_loop().create_task(self._unload(runner))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), 1.0)

    def _take(self, runner: Runner, keep_alive: float | None) -> None:
        runner.refcount += 1
        session = self.default_keep_alive if keep_alive is None else keep_alive
        runner.session = math.inf if session < 0 else session
        if runner.timer is not None:
            runner.timer.cancel()
            runner.timer = None
        runner.expires_at = time.time() + min(runner.session, FOREVER_S)

    async def _runner_for(self, spec: LoadSpec, keep_alive: float | None) -> tuple[Runner, int]:
        runner = self.runners.get(spec.name)
        if runner is not None and runner.usable_for(spec):
            self._take(runner, keep_alive)
            return runner, 0
        async with self._lock:  # one load at a time, like Ollama
            while True:
                runner = self.runners.get(spec.name)
                if runner is None:
                    break
                if runner.usable_for(spec):
                    self._take(runner, keep_alive)
                    return runner, 0
                if runner.refcount > 0 and runner.proc.alive:
                    await self._wait_change()  # reload once its requests are done
                    continue
                await self._unload(runner)
            need = estimate_memory(spec, self.num_parallel, self.kv_cache_type)
            await self._make_room(spec.name, need)
            runner = await self._load(spec, need)
            self._take(runner, keep_alive)
            return runner, runner.load_duration

    async def _load(self, spec: LoadSpec, estimate: int) -> Runner:
        t0 = time.perf_counter_ns()
        proc = RunnerProcess(spec.name, self._on_exit)
        log.info("loading %s (%s, about %d MiB)", spec.name, spec.ref.model_path, estimate >> 20)
        ready = await proc.start(
            load_message(spec, self.backend, self.num_parallel), self.load_timeout
        )
        parallel = max(1, int(ready.get("parallel", 1)))
        runner = Runner(
            spec,
            proc,
            estimate,
            parallel,
            asyncio.Semaphore(parallel),
            load_duration=time.perf_counter_ns() - t0,
            processor={
                k: str(ready[k]) for k in ("backend", "device", "device_name") if k in ready
            },
        )
        self.runners[spec.name] = runner
        self._notify()
        return runner

    def _release(self, runner: Runner) -> None:
        runner.refcount -= 1
        self._notify()
        if runner.refcount > 0 or self.runners.get(runner.name) is not runner:
            return
        if not runner.proc.alive or runner.session <= 0:
            self._spawn_unload(runner)
        elif not math.isinf(runner.session):
            runner.expires_at = time.time() + runner.session
            runner.timer = asyncio.get_running_loop().call_later(
                runner.session, self._expire_idle, runner
            )

    def _expire_idle(self, runner: Runner) -> None:
        runner.timer = None
        if runner.refcount == 0 and self.runners.get(runner.name) is runner:
            self._spawn_unload(runner)

    def _on_exit(self, proc: RunnerProcess) -> None:
        runner = self.runners.get(proc.name)
        if runner is not None and runner.proc is proc and runner.refcount == 0:
            del self.runners[proc.name]
            self._notify()

    async def _unload(self, runner: Runner) -> None:
        if self.runners.get(runner.name) is runner:
            del self.runners[runner.name]
        if runner.timer is not None:
            runner.timer.cancel()
            runner.timer = None
        log.info("unloading %s", runner.name)
        await runner.proc.stop()
        self._notify()

    def _free_memory(self) -> int:
        used = sum(r.estimate for r in self.runners.values())
        if self.memory_limit is not None:
            return self.memory_limit - used
        import psutil

        vm = psutil.virtual_memory()
        return min(vm.available, vm.total - used)

    async def _make_room(self, name: str, need: int) -> None:
        """Evict idle models until one more is allowed and `need` bytes fit (or fail)."""
        while True:
            free = self._free_memory()
            count_ok = len(self.runners) < self.max_loaded
            if count_ok and need <= free:
                return
            idle = sorted(
                (r for r in self.runners.values() if r.refcount == 0),
                key=lambda r: (r.session, r.name),
            )
            if idle:
                log.info("evicting %s to make room for %s", idle[0].name, name)
                await self._unload(idle[0])
                continue
            reclaimable = free + sum(r.estimate for r in self.runners.values())
            if need > reclaimable or not self.runners:
                raise InsufficientMemoryError(
                    f"model '{name}' requires more system memory ({_gib(need)}) than is "
                    f"available ({_gib(max(free, 0))})"
                )
            await self._wait_change()  # every model is busy: wait for one to go idle


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
