"""`ADAPTER` at create: a LoRA GGUF, or a PEFT adapter folder converted to one, checked
against the model it is for before anything is written to the store.

The check is the runner's (`herd.gguf.lora.check_lora`: a LoRA file, the model's
architecture, every adapted tensor in the model with shapes that fit), so a model that
`create` accepts loads, and a mismatch is a ModelfileError at the ADAPTER line naming the
tensor. A PEFT folder (`adapter_config.json` + `adapter_model.safetensors`) is converted
with the model's GGUF as the base (`herd.convert.lora`), in F32 as llama.cpp's converter
writes by default.
"""

from __future__ import annotations

from pathlib import Path

from herd.errors import AdapterError, ConvertError, ModelfileError
from herd.gguf import open_gguf
from herd.gguf.lora import check_lora, open_lora
from herd.modelfile import Command
from herd.store.wheels import Progress


def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def checked_adapter(
    src: Path, base: Path, tmp: Path, cmd: Command, where: str, report: Progress
) -> Path:
    """The LoRA GGUF for ADAPTER `src` (converted into `tmp` when a PEFT folder), checked
    to fit the model GGUF `base`; ModelfileError at the ADAPTER line otherwise."""
    try:
        if is_peft_dir(src):
            from herd.convert.lora import convert_lora

            report("converting adapter", None, None, None)
            src = convert_lora(src, tmp / "adapter.gguf", base, "f32", name=src.name)
        check_lora(open_lora(src), open_gguf(base))
    except (AdapterError, ConvertError) as e:
        raise ModelfileError(f"ADAPTER {cmd.args}: {e}", cmd.line, cmd.column, where) from None
    return src
