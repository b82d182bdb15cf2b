"""ggml backend on ggml-python's libraries.

Install with the kernels llama.cpp uses (ggml's standalone default leaves the llamafile
GEMMs out, which makes prompts and F16 attention several times slower):

    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_LLAMAFILE=ON" pip install ggml-python==0.0.45

GPUs: add `-DGGML_CUDA=on` (NVIDIA; `-DCMAKE_CUDA_ARCHITECTURES=90` builds for one card
generation only, much faster), `-DGGML_METAL=on` (Apple) or `-DGGML_VULKAN=on`. Layers
then go to the GPU by `num_gpu` (-1: as many as fit; `herd.ml.layout`), and
`scripts/gpu_check.sh` builds, tests and benchmarks it on a CUDA machine.

Without ggml-python, importing this package raises ImportError, which the registry reads
as "not installed".

The backend in files by concern: `backend.py` (weights, persistent tensors, options),
`tensor.py` (every op), `context.py` (graphs: nodes, compute, rerun), `placement.py`
(where graphs' tensors go, CPU and scheduler), `devices.py`, `dtypes.py` (types and
shapes at the ctypes boundary), `_lib.py` (the ctypes bindings).
"""

from herd.ml.backends.ggml.backend import GGMLBackend, open_ggml
from herd.ml.backends.ggml.context import GGMLContext
from herd.ml.backends.ggml.devices import probe_devices
from herd.ml.backends.ggml.rpc import add_servers
from herd.ml.backends.ggml.tensor import GGMLTensor
from herd.ml.base import BackendOptions, DeviceInfo


def default_devices(options: BackendOptions | None = None) -> list[DeviceInfo]:
    """The GPUs and RPC servers layers go to by default (num_gpu -1), else the CPU."""
    if options is not None and options.rpc_servers:
        add_servers(options.rpc_servers)
    infos = [d.info for d in probe_devices(options.rpc_servers if options else ())]
    return [d for d in infos if d.kind in ("gpu", "rpc")] or [d for d in infos if d.kind == "cpu"]


__all__ = ["GGMLBackend", "GGMLContext", "GGMLTensor", "default_devices", "open_ggml"]
