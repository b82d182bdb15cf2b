"""`herd convert DIR -o model.gguf`: a Hugging Face directory to a GGUF file (or, with
`--mmproj proj.gguf`, a vision model to llama.cpp's two files: text model and projector)."""

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
@click.option("-q", "--quiet", is_flag=True, help="No per-tensor progress.")
def convert_cmd(
    src: Path, out: Path | None, outtype: str, mmproj: Path | None, quiet: bool
) -> None:
    """Convert a Hugging Face model directory (safetensors or PyTorch) to GGUF."""
    from herd.convert import convert

    out = out if out is not None else Path(f"{src.resolve().name}-{outtype}.gguf")

    def progress(i: int, n: int, name: str, qtype: str, shape: tuple[int, ...]) -> None:
        dims = "x".join(str(d) for d in shape)
        click.echo(f"[{i:{len(str(n))}d}/{n}] {name:<32} {qtype:<5} {dims}", err=True)

    convert(src, out, outtype, progress=None if quiet else progress, mmproj=mmproj)
    for path in (out, mmproj) if mmproj is not None else (out,):
        click.echo(f"wrote {path} ({human_bytes(path.stat().st_size)})", err=True)
