"""`herd convert DIR -o model.gguf`: a Hugging Face directory to a GGUF file (or, with
`--mmproj proj.gguf`, a vision model to llama.cpp's two files: text model and projector).
A PEFT LoRA adapter directory (`adapter_config.json`) with `--base` (the base model's HF
folder or GGUF) becomes a LoRA GGUF in llama.cpp's format."""

from __future__ import annotations

from pathlib import Path

import click

from herd.cli.format import human_bytes


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path),
    default=None,
    help="GGUF file to write (default: <DIR name>-<outtype>.gguf here).",
)
@click.option(
    "--outtype",
    type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
    default="f16",
    show_default=True,
    help="Type of the large weight matrices.",
)
@click.option(
    "--mmproj",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a vision model as llama.cpp does: the text model to the GGUF file, the "
    "vision encoder and projector to this one (default: both in one file, Ollama's layout).",
)
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    default=None,
    help="For a PEFT LoRA adapter directory: its base model (Hugging Face folder or GGUF), "
    "whose tensor names and shapes the adapter is converted and checked against.",
)
@click.option("-q", "--quiet", is_flag=True, help="No per-tensor progress.")
def convert_cmd(
    src: Path,
    out: Path | None,
    outtype: str,
    mmproj: Path | None,
    base: Path | None,
    quiet: bool,
) -> None:
    """Convert a Hugging Face model directory (safetensors or PyTorch) to GGUF, or a PEFT
    LoRA adapter directory (with --base) to a LoRA GGUF."""
    from herd.convert import convert
    from herd.convert.lora import convert_lora, is_peft_dir

    if is_peft_dir(src) or base is not None:
        if base is None:
            raise click.UsageError(f"{src} is a PEFT adapter: name its base model with --base")
        out = out if out is not None else Path(f"{src.resolve().name}-lora-{outtype}.gguf")
        convert_lora(src, out, base, outtype)
        click.echo(f"wrote {out} ({human_bytes(out.stat().st_size)})", err=True)
        return
    out = out if out is not None else Path(f"{src.resolve().name}-{outtype}.gguf")

    def progress(i: int, n: int, name: str, qtype: str, shape: tuple[int, ...]) -> None:
        dims = "x".join(str(d) for d in shape)
        click.echo(f"[{i:{len(str(n))}d}/{n}] {name:<32} {qtype:<5} {dims}", err=True)

    convert(src, out, outtype, progress=None if quiet else progress, mmproj=mmproj)
    for path in (out, mmproj) if mmproj is not None else (out,):
        click.echo(f"wrote {path} ({human_bytes(path.stat().st_size)})", err=True)
