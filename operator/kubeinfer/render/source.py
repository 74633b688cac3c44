"""Parse model sources (`hf://`, `org/repo:QUANT`, `pvc://`) into what an engine and a pod need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kubeinfer import contract

SourceKind = Literal["hf", "pvc"]


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    repo: str = ""  # hf: "org/repo"
    file: str = ""  # hf: a file inside the repo (a .gguf)
    quant: str = ""  # hf: GGUF quant tag of "org/repo:QUANT"
    claim: str = ""  # pvc: claim name
    path: str = ""  # pvc: path inside the claim

    @property
    def local_path(self) -> str:
        """Where a pvc:// source appears inside the engine container."""
        base = f"{contract.PVC_MOUNT_ROOT}/{self.claim}"
        return f"{base}/{self.path}" if self.path else base

    @property
    def is_gguf(self) -> bool:
        return bool(self.quant) or self.file.endswith(".gguf") or self.path.endswith(".gguf")


class UnsupportedSource(ValueError):
    pass


def parse_source(text: str) -> Source:
    if text.startswith(("s3://", "gs://")):
        raise UnsupportedSource(f"{text!r}: s3:// and gs:// sources are not supported yet")
    if text.startswith("pvc://"):
        claim, _, path = text.removeprefix("pvc://").partition("/")
        return Source(kind="pvc", claim=claim, path=path.strip("/"))
    if text.startswith("hf://"):
        parts = text.removeprefix("hf://").split("/")
        return Source(kind="hf", repo="/".join(parts[:2]), file="/".join(parts[2:]))
    repo, _, quant = text.partition(":")
    return Source(kind="hf", repo=repo, quant=quant)


def hf_file_url(source: Source, revision: str = "main") -> str:
    """Download URL of a single file in a Hugging Face repository (llama-server's -mmu)."""
    return f"https://huggingface.co/{source.repo}/resolve/{revision}/{source.file}"
