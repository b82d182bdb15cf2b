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
"""

from herd.ml.backends.ggml.backend import GGMLBackend, GGMLContext, GGMLTensor, open_ggml

__all__ = ["GGMLBackend", "GGMLContext", "GGMLTensor", "open_ggml"]
