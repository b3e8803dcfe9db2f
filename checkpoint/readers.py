"""Recognise a checkpoint on disk and expose its tensors lazily, whatever produced it.

``read_source(path)`` returns a ``Source``: the detected format, the tensors (each a ``TensorSource`` that
reads on demand, so large files stream), the anytopo manifest when there is one, and the non-tensor
entries (for reports). Formats: anytopo's own (file or directory, single or sharded), plain state dicts
(``torch.save(model.state_dict())``), torchvision reference checkpoints, timm ``.pth.tar``, Lightning
``.ckpt``, accelerate ``save_state`` folders and ``save_model`` outputs, HF-style sharded safetensors or
``.bin`` with an index, torch.distributed.checkpoint (DCP) folders, and -- only with ``allow_pickle=True``
-- whole pickled modules.

Nothing here runs code from a file: ``torch.load`` is always ``weights_only=True`` with a short allow-list
of harmless types real checkpoints contain (``torchfiles``); DCP metadata is read with a restricted unpickler
(``dcp``). torch is imported by the readers that need it; safetensors sources are read without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .dcp import read_dcp
from .errors import CheckpointError
from .manifest import BEST_POINTER, MANIFEST, POINTER, Manifest, is_ours, manifest_from_metadata, read_pointer
from .objstore import as_path, is_url
from .policy import scan_entries
from .rank_files import read_sharded
from .safetensors_io import InMemory, TensorSource, read_header
from .sources import Source, with_aliases
from .states import EMA_COMPONENT, component_tensors
from .storage import child, read_json
from .torchfiles import sniff, torch_load
from .wrappers import unwrap

if TYPE_CHECKING:
    import torch


def _short(v: Any) -> str:
    if isinstance(v, (int, float, bool, str)) or v is None:
        s = repr(v)
        return s if len(s) <= 60 else s[:57] + "..."
    if isinstance(v, dict):
        return f"dict({len(v)} keys)"
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__}({len(v)})"
    return type(v).__name__


def _tensor_dict(d: dict, where: str, path: Path) -> dict[str, torch.Tensor]:
    import torch

    tensors = {str(k): v for k, v in d.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: {where} holds no tensors (keys: {', '.join(sorted(map(str, d))[:8])}); "
                              "is this a checkpoint of model weights?")
    return tensors


def _interpret(obj: Any, path: Path, *, ema: bool) -> tuple[str, dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Find the model weights inside whatever torch.load returned: (format, tensors, other entries, notes)."""
    import torch
    from torch import nn

    notes: list[str] = []
    if isinstance(obj, nn.Module):
        return "pickled-module", dict(unwrap(obj).state_dict()), {}, ["whole pickled module (loaded with allow_pickle)"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors or a module; "
                              "cannot find model weights in it")
    other = {str(k): _short(v) for k, v in obj.items() if not isinstance(v, torch.Tensor)}

    def pick(key_plain: str, key_ema: str | None, fmt: str) -> tuple[str, dict[str, torch.Tensor], dict[str, str], list[str]]:
        key = key_plain
        if ema:
            if key_ema is None or not isinstance(obj.get(key_ema), dict):
                raise CheckpointError(f"{path}: no EMA weights in this {fmt} checkpoint (entries: "
                                      f"{', '.join(sorted(map(str, obj))[:10])}); drop ema / --ema")
            key = key_ema
        tensors = _tensor_dict(obj[key], f"entry {key!r}", path)
        rest = {k: v for k, v in other.items() if k != key}
        return fmt, tensors, rest, [f"weights taken from entry {key!r}"]

    if ema and not any(k in obj for k in ("state_dict_ema", "model_ema")):
        raise CheckpointError(f"{path}: no EMA weights (entries: {', '.join(sorted(map(str, obj))[:10])}); drop ema / --ema")
    if isinstance(obj.get("state_dict"), dict):
        if "pytorch-lightning_version" in obj or "global_step" in obj or "lightning" in " ".join(map(str, obj)):
            return pick("state_dict", None, "lightning")
        return pick("state_dict", "state_dict_ema", "timm" if ("arch" in obj or "state_dict_ema" in obj) else "state_dict-entry")
    if isinstance(obj.get("model"), dict):
        fmt, tensors, rest, notes = pick("model", "model_ema", "torchvision-reference")
        if ema:
            # torchvision's ExponentialMovingAverage (an AveragedModel) adds a step counter; not a model weight.
            if tensors.pop("n_averaged", None) is not None:
                notes.append("dropped EMA counter 'n_averaged'")
        return fmt, tensors, rest, notes
    if isinstance(obj.get("model_state_dict"), dict):
        return pick("model_state_dict", None, "tutorial-dict")
    tensors = _tensor_dict(obj, "the top level", path)
    if other:
        notes.append(f"ignored {len(other)} non-tensor entries")
    return "state-dict", tensors, other, notes


def _read_torch_file(path: Path, *, ema: bool, allow_pickle: bool, kind: str) -> Source:
    obj = torch_load(path, allow_pickle=allow_pickle, mmap=(kind == "zip"))
    fmt, tensors, other, notes = _interpret(obj, path, ema=ema)
    sidecar = path.with_name(path.name + ".manifest.json")
    manifest = read_json(sidecar) if sidecar.is_file() else None
    if is_ours(manifest):
        fmt = "anytopo-pth"
    else:
        manifest = None
    return Source(path, fmt, _share(tensors), manifest, other, [path], notes)


def _share(tensors: dict[str, torch.Tensor]) -> dict[str, TensorSource]:
    """Wrap in-memory tensors as sources (tied entries are recognised later, by ``group_tied``)."""
    return {k: InMemory(t) for k, t in tensors.items()}


def _read_safetensors_file(path: Path, fmt: str = "safetensors") -> Source:
    tensors, meta = read_header(path)
    manifest = manifest_from_metadata(meta)
    if manifest is not None:
        fmt = "anytopo-safetensors"
    return Source(path, fmt, with_aliases(dict(tensors), manifest), manifest, {}, [path], [])


def _read_index(index_path: Path, *, allow_pickle: bool) -> Source:
    """HF-style sharded checkpoint: {"metadata": ..., "weight_map": {tensor: shard file}}."""
    idx = read_json(index_path)
    if not isinstance(idx, dict) or not isinstance(idx.get("weight_map"), dict):
        raise CheckpointError(f"{index_path}: not a shard index (no 'weight_map'); the file is damaged")
    directory = index_path.parent
    shards = sorted(set(idx["weight_map"].values()))
    tensors: dict[str, TensorSource] = {}
    for shard in shards:
        p = child(directory, shard, listed_in=f"{index_path.name}'s weight_map")
        if not p.is_file():
            raise CheckpointError(f"{p}: missing shard listed in {index_path.name}; the checkpoint is incomplete, "
                                  "re-copy all shards or use an earlier checkpoint")
        if shard.endswith(".safetensors"):
            part, _ = read_header(p)
            tensors.update(part)
        else:
            mapped = sniff(p) == "zip"
            obj = torch_load(p, allow_pickle=allow_pickle, mmap=mapped)
            tensors.update(_share(_tensor_dict(obj, "shard", p)))
    wanted = set(idx["weight_map"])
    absent = sorted(wanted.difference(tensors))
    if absent:
        raise CheckpointError(f"{index_path}: {len(absent)} tensors listed in the index are in no shard "
                              f"(e.g. {absent[:3]}); the shards do not belong to this index")
    meta = idx.get("metadata") or {}
    manifest = manifest_from_metadata(meta) if isinstance(meta, dict) else None
    fmt = "anytopo-sharded" if manifest else ("sharded-safetensors" if shards[0].endswith(".safetensors") else "sharded-bin")
    tensors = {k: tensors[k] for k in idx["weight_map"]}
    return Source(index_path, fmt, with_aliases(tensors, manifest), manifest, {}, [directory / s for s in shards], [])


def _read_directory(path: Path, *, ema: bool, allow_pickle: bool) -> Source:
    manifest_path = path / MANIFEST
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        if is_ours(manifest) and manifest.get("sharded"):
            if ema:  # its rank files hold the model's weights only; silently loading those would be wrong
                raise CheckpointError(f"{path}: a sharded entry holds the model's weights only, no EMA weights "
                                      "(--ema is refused with fsdp); drop ema / --ema")
            tensors = with_aliases(read_sharded(path, manifest), manifest)  # tied: one source, several keys
            files = [child(path, n, listed_in=MANIFEST) for n in manifest["sharded"]["files"]]
            return Source(path, "anytopo-sharded-ranks", tensors, manifest, {}, files,
                          [f"assembled from {len(files)} rank files (world {manifest['sharded']['world_size']})"])
        if is_ours(manifest) and ema:
            return _entry_ema(path, manifest)
        if is_ours(manifest):
            weights = manifest.get("weights")
            if not weights:
                raise CheckpointError(f"{manifest_path}: lists no weights file; the checkpoint is damaged")
            src = read_source(child(path, weights, listed_in=MANIFEST), ema=ema, allow_pickle=allow_pickle)
            src.manifest = {**(src.manifest or {}), **manifest}
            src.tensors = with_aliases(src.tensors, src.manifest)
            src.format = "anytopo-" + ("sharded" if weights.endswith(".index.json") else Path(weights).suffix.lstrip("."))
            src.path = path
            return src
    pointer = path / POINTER
    if pointer.is_file():
        target = read_pointer(pointer)
        if not target or not (path / target).is_dir():
            raise CheckpointError(f"{pointer}: points to {target!r}, which is not an entry here; use "
                                  "CheckpointManager(dir).latest() to find the newest good entry")
        return read_source(path / target, ema=ema, allow_pickle=allow_pickle)
    if is_url(path):  # an object store keeps no pointer: its newest committed entry is the latest
        entries = scan_entries(path)
        if entries:
            return read_source(entries[-1][1], ema=ema, allow_pickle=allow_pickle)
    indexes = sorted(path.glob("*.index.json"))
    if len(indexes) == 1:
        return _read_index(indexes[0], allow_pickle=allow_pickle)
    if len(indexes) > 1:
        raise CheckpointError(f"{path}: several shard indexes ({', '.join(i.name for i in indexes)}); "
                              "pass the index file you want")
    for name in ("model.safetensors", "pytorch_model.bin", "model.pth"):
        if (path / name).is_file():
            src = read_source(path / name, ema=ema, allow_pickle=allow_pickle)
            others = sorted(p.name for p in path.iterdir() if p.name != name)
            if others:
                src.other.update({n: "file" for n in others})
                src.format = "accelerate-folder" if any(n.startswith(("optimizer", "random_states")) for n in others) \
                    else src.format
            return src
    if (path / ".metadata").is_file():
        if is_url(path):
            raise CheckpointError(f"{path}: a torch.distributed.checkpoint folder is read from a local path only; "
                                  "copy it to a disk first (or `anytopo-ckpt convert` it there)")
        return read_dcp(path)
    found = sorted(p.name for p in path.iterdir())[:8]
    raise CheckpointError(f"{path} is a directory but not a checkpoint (found: {', '.join(found) or 'nothing'}); "
                          "expected manifest.json, model.safetensors, pytorch_model.bin, *.index.json or a DCP "
                          ".metadata -- pass the checkpoint file or folder itself")


def _entry_ema(path: Path, manifest: dict[str, Any]) -> Source:
    """The EMA weights of a training entry: its ``ema`` component (an ``AveragedModel``'s state), under the
    model's own keys (the ``module.`` the averaged copy adds is removed, its counter ``n_averaged`` dropped)."""
    m = Manifest(manifest)
    tensors = component_tensors(path, EMA_COMPONENT) if EMA_COMPONENT in m.components else None
    if tensors is None:
        raise CheckpointError(f"{path}: this entry holds no EMA weights (components: {', '.join(m.components) or 'none'}); "
                              "train with --ema DECAY to keep them, or drop ema / --ema")
    notes = ["weights taken from the entry's 'ema' component"]
    if tensors.pop("n_averaged", None) is not None:
        notes.append("dropped EMA counter 'n_averaged'")
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    files = [path / n for n in m.files if n.startswith("state.")]
    return Source(path, "anytopo-entry-ema", tensors, manifest, {}, files, notes)


def _follow_pointer_file(path: Path) -> Path | None:
    """The entry a ``latest`` or ``best`` pointer file beside the entries names (None if ``path`` is no such
    file), so ``checkpoints/best`` and ``checkpoints/latest`` can be given wherever an entry can."""
    if path.name == POINTER:
        name = read_pointer(path)
    elif path.name == BEST_POINTER:
        try:
            record = read_json(path)
        except CheckpointError:
            return None
        name = record.get("entry") if isinstance(record, dict) else None
    else:
        return None
    if not isinstance(name, str) or not name or "/" in name or not (path.parent / name / MANIFEST).is_file():
        raise CheckpointError(f"{path}: points to {name!r}, which is not an entry beside it; use "
                              "CheckpointManager(dir).latest() / .best() to find a good entry")
    return path.parent / name


def read_source(path: str | Path, *, ema: bool = False, allow_pickle: bool = False) -> Source:
    """Detect the format of ``path`` and return its tensors lazily.

    Args:
        path: a checkpoint file or directory (see the module docstring for the formats).
        ema: take EMA weights (timm ``state_dict_ema``, torchvision ``model_ema``, the ``ema`` component of an
            anytopo training entry) instead of the model's.
        allow_pickle: allow whole pickled modules and other code-carrying pickles. Only for trusted files.

    Raises:
        CheckpointError: the path is missing, empty, damaged, not a checkpoint, or needs ``allow_pickle``.
    """
    path = as_path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint: {path}; check the path")
    if path.is_dir():
        return _read_directory(path, ema=ema, allow_pickle=allow_pickle)
    entry = _follow_pointer_file(path)
    if entry is not None:
        return read_source(entry, ema=ema, allow_pickle=allow_pickle)
    if path.name == ".metadata" and not is_url(path):
        return read_dcp(path.parent)
    if path.name.endswith(".index.json"):
        return _read_index(path, allow_pickle=allow_pickle)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the save was interrupted or the copy failed, "
                              "use an earlier checkpoint")
    kind = sniff(path)
    if kind == "safetensors":
        src = _read_safetensors_file(path)
        if ema:
            raise CheckpointError(f"{path}: a safetensors file holds one set of weights, no EMA; drop ema / --ema")
        return src
    if kind == "safetensors-truncated":
        raise CheckpointError(f"{path}: truncated safetensors file (header longer than the file); "
                              "the save or copy was interrupted, re-copy it or use an earlier checkpoint")
    if kind in ("zip", "pickle"):
        return _read_torch_file(path, ema=ema, allow_pickle=allow_pickle, kind=kind)
    if path.suffix in (".json", ".txt", ".yaml", ".md"):
        raise CheckpointError(f"{path} is a {path.suffix} file, not a checkpoint; pass the checkpoint file or folder")
    raise CheckpointError(f"{path} is not a checkpoint: its first bytes match no known format "
                          "(safetensors, torch.save zip or pickle); the file is damaged or of another kind")


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The anytopo manifest of a checkpoint without reading its tensors (None for foreign files).

    Resolves a manager directory through its ``latest`` pointer, and a ``latest``/``best`` pointer file to its
    entry (unverified; use ``CheckpointManager.latest()``/``.best()`` for the verified choice).
    """
    path = as_path(path)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            m = read_json(path / MANIFEST)
            return m if is_ours(m) else None
        target = read_pointer(path / POINTER)
        if target is None and is_url(path):
            entries = scan_entries(path)
            return read_manifest(entries[-1][1]) if entries else None
        return read_manifest(path / target) if target else None
    entry = _follow_pointer_file(path)
    if entry is not None:
        return read_manifest(entry)
    sidecar = path.with_name(path.name + ".manifest.json")
    if sidecar.is_file():
        return read_json(sidecar)
    if path.is_file() and sniff(path) == "safetensors":
        return manifest_from_metadata(read_header(path)[1])
    return None
