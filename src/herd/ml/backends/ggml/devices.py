"""ggml's devices as herd sees them: what they report, the memory the CPU can still give,
and the cores ggml's threads should use."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass

from herd.errors import BackendError
from herd.ml.backends.ggml import _lib as L
from herd.ml.base import DeviceInfo


@dataclass
class Device:
    """A ggml device as the layout sees it: what it reports, and its ggml handle."""

    info: DeviceInfo
    handle: int  # ggml_backend_dev_t


@dataclass
class GPU:
    """A device that holds layers: its ggml backend and the buffer type it allocates."""

    index: int  # in the plan's GPU list
    device: Device
    backend: int
    buft: int


def physical_cores() -> int:
    """Physical cores this process may run on (ggml's threads gain nothing from SMT)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = os.cpu_count() or 1
    cores = set()
    try:
        with open("/proc/cpuinfo") as f:
            phys = ""
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    cores.add((phys, line.split(":")[1].strip()))
    except OSError:
        pass
    return max(1, min(len(cores) or allowed, allowed))


def system_memory() -> tuple[int, int]:
    """(total RAM, what can still be used: available RAM plus free swap), in bytes."""
    try:
        import psutil

        vm, swap = psutil.virtual_memory(), psutil.swap_memory()
        return int(vm.total), int(vm.available + swap.free)
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")


def probe_devices(rpc_servers: Sequence[str] = ()) -> list[Device]:
    """ggml's devices with their memory now; the CPU's free memory is what the system can
    still give (available RAM + free swap), not ggml's MemFree. RPC servers only where
    named: ggml keeps every server registered in this process, and asking one that has
    gone away for its memory aborts the process (rpc.py checks the named ones first)."""
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    out = []
    for i in range(L.ggml_backend_dev_count()):
        dev = L.ggml_backend_dev_get(i)
        kind = L.DEV_TYPE_NAMES.get(L.ggml_backend_dev_type(dev), "other")
        if L.ggml_backend_reg_name(L.ggml_backend_dev_backend_reg(dev)) == b"RPC":
            kind = "rpc"  # a remote server (ggml calls it a GPU whatever it runs on)
            if L.ggml_backend_dev_description(dev).decode() not in rpc_servers:
                continue
        if kind == "cpu":
            total.value, free.value = system_memory()
        else:
            L.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        name = L.ggml_backend_dev_name(dev).decode()
        desc = L.ggml_backend_dev_description(dev).decode()
        out.append(Device(DeviceInfo(f"{name} ({desc})", kind, total.value, free.value), dev))
    return out


def cpu_device() -> int:
    """ggml's CPU device (ggml_backend_dev_t)."""
    return next(
        d
        for i in range(L.ggml_backend_dev_count())
        if L.ggml_backend_dev_type(d := L.ggml_backend_dev_get(i)) == L.DEV_TYPE_CPU
    )


def start_gpu(index: int, device: Device, num_thread: int) -> GPU:
    """Start a ggml backend on a device that will hold layers."""
    backend = L.ggml_backend_dev_init(device.handle, None)
    if not backend:
        raise BackendError(f"ggml: cannot start {device.info.name}")
    if L.ggml_backend_dev_type(device.handle) == L.DEV_TYPE_CPU:  # a stand-in (tests)
        L.ggml_backend_cpu_set_n_threads(backend, num_thread)
    return GPU(index, device, backend, L.ggml_backend_dev_buffer_type(device.handle))
