"""Write checkpoint files in the layout a path asks for, from tensor sources, atomically.

- ``x.safetensors``: one safetensors file; the manifest (without hashes) rides in its ``__metadata__`` so a
  lone copied file keeps its provenance.
- ``x.pth``/``.pt``/``.pkl``/``.bin``: a plain dict of tensors (``torch.load(..., weights_only=True)`` then
  ``model.load_state_dict`` works in any code), manifest beside it as ``<name>.manifest.json``.
- any other path: a directory with ``model.safetensors`` (or shards ``model-00001-of-0000N.safetensors`` plus
  ``model.safetensors.index.json``) and ``manifest.json`` holding the sha256 of every data file.

Every file is written to a temporary name in the same directory, flushed, fsynced and renamed; a directory is
built under a temporary name and renamed into place with its manifest written last (``storage``). No
distributed logic here: a sharded model's ``Gathered`` sources write themselves (``gather``).
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Mapping

from .errors import CheckpointError
from .gather import common_plan
from .manifest import MANIFEST, safetensors_metadata
from .safetensors_io import InMemory, TensorSource, plan_header, write_file
from .storage import atomic_dir, atomic_file, atomic_write_text, sha256_file

if TYPE_CHECKING:
    import torch

TORCH_SUFFIXES = (".pth", ".pt", ".pkl", ".bin")


SINGLE_NAME = "model.safetensors"


INDEX_NAME = "model.safetensors.index.json"


def parse_size(size: int | str | None) -> int | None:
    """'2GB' -> 2_000_000_000, '512MiB' -> 536_870_912, ints pass through."""
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), re.IGNORECASE)
    if not m:
        raise CheckpointError(f"bad size {size!r}: use a number of bytes or e.g. 500MB, 2GB, 1GiB")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base ** power)


def _plan_shards(entries: list[tuple[str, TensorSource]], max_bytes: int | None) -> list[list[tuple[str, TensorSource]]]:
    if not max_bytes:
        return [entries]
    shards: list[list[tuple[str, TensorSource]]] = [[]]
    size = 0
    for k, e in entries:
        n = e.nbytes
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((k, e))
        size += n
    return shards


def write_safetensors(path: Path, entries: list[tuple[str, TensorSource]], manifest: Mapping[str, Any],
                      digests: dict[str, str] | None = None) -> int:
    """Write one safetensors file atomically. With ``digests``, record its sha256 there, computed while
    writing when every entry is a plain in-memory tensor (file-to-file copies bypass ``write``: those files
    are hashed after)."""
    inline = digests is not None and all(type(e) is InMemory for _, e in entries)
    metadata = safetensors_metadata(manifest)
    plan = common_plan(entries)  # a sharded model's tensors: every rank writes its own rows into the file
    with atomic_file(path, sha256=inline) as f:
        if plan is None:
            n = write_file(f, entries, metadata)
        else:
            header, sizes = plan_header([(k, e.dtype_name, e.shape) for k, e in entries], metadata)
            offsets = list(itertools.accumulate(sizes, initial=len(header)))
            written = [(i, k, e) for i, (k, e) in enumerate(entries) if sizes[i]]  # write_file skips empty ones
            with plan.shared_file(f, f.temp_path, [(k, e) for _, k, e in written], [offsets[i] for i, _, _ in written]):
                n = write_file(f, entries, metadata)
    if inline:
        digests[path.name] = f.hexdigest()
    return n


def write_torch(path: Path, sd: Mapping[str, torch.Tensor]) -> None:
    import torch

    with atomic_file(path) as f:
        torch.save(dict(sd), f)


def write_directory(path: Path, entries: list[tuple[str, TensorSource]], manifest: dict[str, Any], *,
                    max_shard_size: int | None = None, fmt: str = "safetensors",
                    extra_files: Mapping[str, bytes | Callable[[BinaryIO], Any]] | None = None) -> Path:
    """Write a checkpoint directory atomically: data files, extra files, then manifest.json with hashes.

    ``extra_files`` maps a name to its bytes or to a function that writes them into an open file (through
    ``write`` only, so they are hashed while written).
    """
    digests: dict[str, str] = {}
    with atomic_dir(path) as tmp:
        files: list[str] = []
        if fmt == "pth":
            write_torch(tmp / "model.pth", _undedupe({k: e.read() for k, e in entries}, manifest.get("aliases") or {}))
            files.append("model.pth")
            manifest["weights"] = "model.pth"
        else:
            shards = _plan_shards(entries, max_shard_size)
            if len(shards) == 1:
                write_safetensors(tmp / SINGLE_NAME, shards[0], manifest, digests)
                files.append(SINGLE_NAME)
                manifest["weights"] = SINGLE_NAME
            else:
                n = len(shards)
                weight_map = {}
                for i, shard in enumerate(shards, 1):
                    name = f"model-{i:05d}-of-{n:05d}.safetensors"
                    write_safetensors(tmp / name, shard, manifest, digests)
                    files.append(name)
                    weight_map.update({k: name for k, _ in shard})
                index = {"metadata": {"total_size": manifest["total_bytes"], **safetensors_metadata(manifest)},
                         "weight_map": weight_map}
                atomic_write_text(tmp / INDEX_NAME, json.dumps(index, indent=1))
                files.append(INDEX_NAME)
                manifest["weights"] = INDEX_NAME
        for name, data in (extra_files or {}).items():
            with atomic_file(tmp / name, sha256=True) as f:
                data(f) if callable(data) else f.write(data)
            digests[name] = f.hexdigest()
            files.append(name)
        manifest["files"] = {n: {"bytes": (tmp / n).stat().st_size,
                                 "sha256": digests[n] if n in digests else sha256_file(tmp / n)} for n in files}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return path


def write_checkpoint(path: Path, entries: list[tuple[str, TensorSource]], manifest: dict[str, Any], *,
                     max_shard_size: int | str | None = None, fmt: str | None = None,
                     extra_files: Mapping[str, bytes | Callable[[BinaryIO], Any]] | None = None) -> Path:
    """Write tensors (lazily read) in the layout ``path`` asks for. No distributed logic here."""
    max_bytes = parse_size(max_shard_size)
    suffix = path.suffix.lower()
    if suffix == ".safetensors" or suffix in TORCH_SUFFIXES:
        if fmt is not None and (fmt == "pth") != (suffix in TORCH_SUFFIXES):
            raise CheckpointError(f"{path}: the suffix says {suffix} but format {fmt!r} was asked; "
                                  "make them agree or give a directory path")
        total = sum(e.nbytes for _, e in entries)
        if max_bytes and total > max_bytes:
            raise CheckpointError(f"{path}: {total} bytes do not fit one shard of {max_bytes}; "
                                  "sharded checkpoints are directories, pass a path without a suffix")
        if suffix == ".safetensors":
            write_safetensors(path, entries, manifest)
            return path
        write_torch(path, _undedupe({k: e.read() for k, e in entries}, manifest.get("aliases") or {}))
        manifest["files"] = {path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}}
        manifest["weights"] = path.name
        atomic_write_text(path.with_name(path.name + ".manifest.json"), json.dumps(manifest, indent=1, sort_keys=True))
        return path
    if fmt not in (None, "safetensors", "pth"):
        raise CheckpointError(f"unknown format {fmt!r}: use safetensors or pth")
    return write_directory(path, entries, manifest, max_shard_size=max_bytes, fmt=fmt or "safetensors",
                           extra_files=extra_files)


def _undedupe(sd: dict[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """.pth files store tied entries as the same tensor (torch.save keeps sharing), so add aliases back."""
    out = dict(sd)
    out.update({a: sd[s] for a, s in aliases.items() if s in sd})
    return dict(sorted(out.items()))
