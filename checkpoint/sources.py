"""What a checkpoint holds, whatever wrote it: a ``Source`` of lazily read tensors, and the one definition
of tied entries (``group_tied``) that save, convert, inspect and the readers share.

Plain Python: tensors are read (and torch imported) only when a source is materialized.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .manifest import verify_files
from .safetensors_io import TensorSource

if TYPE_CHECKING:
    import torch


@dataclass
class Source:
    """What a checkpoint holds, read lazily."""

    path: Path
    format: str
    tensors: dict[str, TensorSource]
    manifest: dict[str, Any] | None = None
    other: dict[str, str] = field(default_factory=dict)  # non-tensor entries: name -> short type/value
    files: list[Path] = field(default_factory=list)  # data files backing the tensors
    notes: list[str] = field(default_factory=list)  # what the reader chose or dropped

    def materialize(self) -> dict[str, torch.Tensor]:
        """All tensors in memory (CPU). Tied entries are read once and stay the same tensor object."""
        stored, aliases = group_tied(self.tensors)
        out = {k: s.read() for k, s in stored.items()}
        out.update({alias: out[key] for alias, key in aliases.items()})
        return {k: out[k] for k in self.tensors}


def group_tied(sources: Mapping[str, TensorSource]) -> tuple[dict[str, TensorSource], dict[str, str]]:
    """Split entries into those to store and tied ones: ``(stored, aliases)``, ``aliases`` mapping each tied
    key to the stored key it shares its bytes with (the first in sorted order). Both are sorted by key.

    Entries are tied when their ``identity()`` is equal: the same storage, offset, shape, stride and dtype
    for tensors in memory, the same file bytes for slices (empty tensors are never tied). This is the one
    definition of "tied" that ``save``, ``convert`` and ``inspect`` share; readers re-create the aliases.
    """
    first: dict[object, str] = {}
    stored: dict[str, TensorSource] = {}
    aliases: dict[str, str] = {}
    for k in sorted(sources):
        ident = sources[k].identity()
        if ident in first:
            aliases[k] = first[ident]
        else:
            first[ident] = k
            stored[k] = sources[k]
    return stored, aliases


def with_aliases(tensors: dict[str, TensorSource], manifest: dict[str, Any] | None) -> dict[str, TensorSource]:
    """Re-create tied entries that were stored once (manifest 'aliases': alias -> stored key)."""
    aliases = (manifest or {}).get("aliases") or {}
    out = dict(tensors)
    for alias, stored in aliases.items():
        if stored in tensors:
            out[alias] = tensors[stored]
    return out


def check_integrity(src: "Source", *, hashes: bool) -> list[str]:
    """What can be checked of a source's files: manifest sizes (and sha256 with ``hashes``), or for a bare
    safetensors file its header and data extents (validated by the safetensors library when it was opened).
    Returns report lines."""
    if src.manifest and src.manifest.get("files"):
        return verify_files(src.path if src.path.is_dir() else src.path.parent, src.manifest, hashes=hashes)
    return ["safetensors header and data extents checked"] if src.format.endswith("safetensors") else []
