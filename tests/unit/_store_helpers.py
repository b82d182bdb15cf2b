"""Small real files for store/CLI tests: tiny GGUFs and wheels (no network, no mocks)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import gguf
import numpy as np


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    template: str | None = "{{ messages }}",
    file_type: int | None = 3,
    extra: dict[str, str] | None = None,
) -> Path:
    """A valid GGUF with two F32 tensors: 16*8 + 8 = 136 parameters."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(2048)
    w.add_embedding_length(8)
    if file_type is not None:
        w.add_file_type(file_type)
    if template is not None:
        w.add_chat_template(template)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_bytes(tmp: Path, **kw: object) -> bytes:
    return write_gguf(tmp / "model-src.gguf", **kw).read_bytes()  # type: ignore[arg-type]


def write_wheel(dest: Path, project: str, version: str, members: dict[str, bytes]) -> Path:
    dist = project.replace("-", "_")
    path = dest / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path
