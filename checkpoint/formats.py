"""Recognise a checkpoint on disk and expose its tensors lazily, whatever produced it.

``read_source(path)`` returns a ``Source``: the detected format, the tensors (each a ``TensorSource`` that
reads on demand, so large files stream), the anytopo manifest when there is one, and the non-tensor
entries (for reports). Formats: anytopo's own (file or directory, single or sharded), plain state dicts
(``torch.save(model.state_dict())``), torchvision reference checkpoints, timm ``.pth.tar``, Lightning
``.ckpt``, accelerate ``save_state`` folders and ``save_model`` outputs, HF-style sharded safetensors or
``.bin`` with an index, torch.distributed.checkpoint (DCP) folders, and -- only with ``allow_pickle=True``
-- whole pickled modules.

Nothing here runs code from a file: ``torch.load`` is always ``weights_only=True`` with a short allow-list
of harmless types real checkpoints contain; DCP metadata is read with a restricted unpickler.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import pickle
import pickletools
import re
import warnings
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ._safetensors_io import InMemory, TensorSource, read_header
from .errors import CheckpointError, first_line

if TYPE_CHECKING:
    import torch

# torch is imported by the readers that need it (torch.load, DCP); safetensors sources are read without it.

MANIFEST = "manifest.json"
POINTER = "latest"
FORMAT_TAG = "anytopo"
# Types a real checkpoint pickles next to its tensors that cannot run code when rebuilt.
SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                pathlib.PureWindowsPath]


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


# ----------------------------------------------------------------------------------------------- helpers

def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e}); the file is damaged or not part of a checkpoint") from None


def read_pointer(path: Path) -> str | None:
    """The entry name a ``latest`` pointer file holds, or None when it is missing, empty, torn, binary or
    not a plain name (callers then fall back to scanning for the newest entry that verifies)."""
    try:
        raw = path.read_bytes()[:4096]
    except OSError:
        return None
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if not name or "/" in name or "\\" in name or name in (".", "..") or not name.isprintable():
        return None
    return name


def verify_files(directory: Path, manifest: dict[str, Any], *, hashes: bool) -> list[str]:
    """Check every file the manifest lists: present, right size, and (``hashes``) right sha256.

    Returns what was checked, as report lines. Raises CheckpointError on the first problem.
    """
    files = manifest.get("files") or {}
    for name, info in sorted(files.items()):
        p = directory / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing file listed in {MANIFEST}; the checkpoint is incomplete, "
                                  "re-copy the whole directory or use an earlier checkpoint")
        size = p.stat().st_size
        if size != info.get("bytes", size):
            raise CheckpointError(f"{p}: size {size} bytes, manifest says {info['bytes']}; the file is truncated "
                                  "or was replaced, re-copy it or use an earlier checkpoint")
        if hashes and sha256_file(p) != info.get("sha256"):
            raise CheckpointError(f"{p}: sha256 does not match {MANIFEST}; the file is corrupted or was changed "
                                  "after saving, re-copy it or use an earlier checkpoint")
    if not files:
        return []
    return [f"sha256 verified for {len(files)} file(s)" if hashes else f"sizes verified for {len(files)} file(s)"]


def check_integrity(src: "Source", *, hashes: bool) -> list[str]:
    """What can be checked of a source's files: manifest sizes (and sha256 with ``hashes``), or for a bare
    safetensors file its header and data extents (validated by the safetensors library when it was opened).
    Returns report lines."""
    if src.manifest and src.manifest.get("files"):
        return verify_files(src.path if src.path.is_dir() else src.path.parent, src.manifest, hashes=hashes)
    return ["safetensors header and data extents checked"] if src.format.endswith("safetensors") else []


def _short(v: Any) -> str:
    if isinstance(v, (int, float, bool, str)) or v is None:
        s = repr(v)
        return s if len(s) <= 60 else s[:57] + "..."
    if isinstance(v, dict):
        return f"dict({len(v)} keys)"
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__}({len(v)})"
    return type(v).__name__


def _sniff(path: Path) -> str:
    """'safetensors', 'zip', 'pickle' or 'unknown', from the first bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) > 8 and head[8:].lstrip(b" \t\r\n")[:1] == b"{":  # safetensors allows leading whitespace
        (n,) = struct.unpack("<Q", head[:8])
        if 8 + n <= size:
            return "safetensors"
        return "safetensors-truncated"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


# ------------------------------------------------------------------------------------------ torch.load

def _first_global(path: Path) -> str | None:
    """The first callable a pickle references, found by parsing its opcodes (nothing is executed).

    Legacy ``torch.save`` files are several pickles in a row (magic number, version, sizes, object), so
    successive pickles are scanned. Raises CheckpointError when the first bytes are not a parseable
    pickle (damaged rather than code-carrying).
    """
    with open(path, "rb") as f:
        for n in range(5):
            strings: list[str] = []
            try:
                for op, arg, _ in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        return str(arg).replace(" ", ".")
                    if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        return f"{strings[-2]}.{strings[-1]}"
                    if isinstance(arg, str):
                        strings.append(arg)
            except Exception:
                if n == 0:
                    raise CheckpointError(f"{path}: not a readable torch checkpoint (damaged pickle data); "
                                          "re-copy it or use an earlier checkpoint") from None
                return None
    return None


def _torch_load(path: Path, *, allow_pickle: bool, mmap: bool) -> Any:
    """torch.load with weights_only=True; unsafe pickles only with explicit opt-in."""
    import torch

    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            # raw pickles (not torch.save) make torch warn about the protocol before refusing them
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"GLOBAL ([\w.]+)", msg)
        culprit = m.group(1) if m else (None if _sniff(path) == "zip" else _first_global(path))
        if not allow_pickle:
            if culprit is None and _sniff(path) != "zip":
                raise CheckpointError(f"{path}: not a readable torch checkpoint ({first_line(e)}); "
                                      "the file is damaged, re-copy it or use an earlier checkpoint") from None
            what = f" (it references {culprit})" if culprit else ""
            raise CheckpointError(
                f"{path} holds pickled Python objects{what}; loading them can run arbitrary code, so it is refused. "
                "If you trust its source, pass allow_pickle=True (CLI: --allow-pickle) and re-save it with "
                "`anytopo-ckpt convert` to get a safe file") from None
        if m is None and "Weights only load failed" not in msg:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first_line(e)}); "
                              "the file is damaged or truncated, re-copy it or use an earlier checkpoint") from None
    # Explicit opt-in: the caller trusts this file.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: could not unpickle it even with allow_pickle ({first_line(e)}); the file is damaged "
                              "or needs code that is not importable here") from None


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
        from ._unwrap import unwrap

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
    obj = _torch_load(path, allow_pickle=allow_pickle, mmap=(kind == "zip"))
    fmt, tensors, other, notes = _interpret(obj, path, ema=ema)
    sidecar = path.with_name(path.name + ".manifest.json")
    manifest = read_json(sidecar) if sidecar.is_file() else None
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT_TAG:
        fmt = "anytopo-pth"
    else:
        manifest = None
    return Source(path, fmt, _share(tensors), manifest, other, [path], notes)


def _share(tensors: dict[str, torch.Tensor]) -> dict[str, TensorSource]:
    """Wrap in-memory tensors as sources (tied entries are recognised later, by ``group_tied``)."""
    return {k: InMemory(t) for k, t in tensors.items()}


# ---------------------------------------------------------------------------------------- safetensors

def _manifest_from_metadata(meta: dict[str, str]) -> dict[str, Any] | None:
    raw = meta.get(FORMAT_TAG)
    if raw is None:
        return None
    try:
        m = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return m if isinstance(m, dict) else None


def _with_aliases(tensors: dict[str, TensorSource], manifest: dict[str, Any] | None) -> dict[str, TensorSource]:
    """Re-create tied entries that were stored once (manifest 'aliases': alias -> stored key)."""
    aliases = (manifest or {}).get("aliases") or {}
    out = dict(tensors)
    for alias, stored in aliases.items():
        if stored in tensors:
            out[alias] = tensors[stored]
    return out


def _read_safetensors_file(path: Path, fmt: str = "safetensors") -> Source:
    tensors, meta = read_header(path)
    manifest = _manifest_from_metadata(meta)
    if manifest is not None:
        fmt = "anytopo-safetensors"
    return Source(path, fmt, _with_aliases(dict(tensors), manifest), manifest, {}, [path], [])


def _read_index(index_path: Path, *, allow_pickle: bool) -> Source:
    """HF-style sharded checkpoint: {"metadata": ..., "weight_map": {tensor: shard file}}."""
    idx = read_json(index_path)
    if not isinstance(idx, dict) or not isinstance(idx.get("weight_map"), dict):
        raise CheckpointError(f"{index_path}: not a shard index (no 'weight_map'); the file is damaged")
    directory = index_path.parent
    shards = sorted(set(idx["weight_map"].values()))
    tensors: dict[str, TensorSource] = {}
    for shard in shards:
        p = directory / shard
        if not p.is_file():
            raise CheckpointError(f"{p}: missing shard listed in {index_path.name}; the checkpoint is incomplete, "
                                  "re-copy all shards or use an earlier checkpoint")
        if shard.endswith(".safetensors"):
            part, _ = read_header(p)
            tensors.update(part)
        else:
            mapped = _sniff(p) == "zip"
            obj = _torch_load(p, allow_pickle=allow_pickle, mmap=mapped)
            tensors.update(_share(_tensor_dict(obj, "shard", p)))
    wanted = set(idx["weight_map"])
    absent = sorted(wanted.difference(tensors))
    if absent:
        raise CheckpointError(f"{index_path}: {len(absent)} tensors listed in the index are in no shard "
                              f"(e.g. {absent[:3]}); the shards do not belong to this index")
    meta = idx.get("metadata") or {}
    manifest = _manifest_from_metadata(meta) if isinstance(meta, dict) else None
    fmt = "anytopo-sharded" if manifest else ("sharded-safetensors" if shards[0].endswith(".safetensors") else "sharded-bin")
    tensors = {k: tensors[k] for k in idx["weight_map"]}
    return Source(index_path, fmt, _with_aliases(tensors, manifest), manifest, {}, [directory / s for s in shards], [])


# ------------------------------------------------------------------------------------------------ DCP

class _DCPMetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP's .metadata (a pickle) from an allow-list of plain metadata classes only."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata" or (
                module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo"):
            return super().find_class(module, name)
        import torch

        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) in {("torch.serialization", "_get_layout"), ("torch._utils", "_get_layout"),
                              ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}:
            return super().find_class(module, name)
        if module == "pathlib" and name in {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to rebuild {module}.{name} from DCP metadata")


def _read_dcp(directory: Path) -> Source:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
    from torch.distributed.checkpoint.storage import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            try:
                with open(directory / ".metadata", "rb") as f:
                    md = _DCPMetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
                raise CheckpointError(f"{directory}/.metadata: unreadable DCP metadata ({e}); "
                                      "the checkpoint is damaged or not from torch.distributed.checkpoint") from None
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    reader = SafeReader(directory)
    try:
        md = reader.read_metadata()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{directory}/.metadata: unreadable DCP metadata ({first_line(e)}); the checkpoint is damaged") from None
    # Only .metadata is read here; each tensor is read on demand (DCPTensor), one at a time: its saved chunks'
    # raw bytes straight from the .distcp files where their layout is proven (checkpoint/_dcp_stream.py),
    # else through DCP's reader. inspect reads no data; load and convert hold no copy of a tensor.
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    items = getattr(md, "state_dict_metadata", {}) or {}
    tensor_keys = [k for k, v in items.items() if isinstance(v, TensorStorageMetadata)]
    notes = []
    # A state saved as {"model": {...}, ...}: the weights are its 'model' entry (DCP's planner_data keeps the
    # nesting: "model.a.w" -> ("model", "a.w")). Keys saved flat as "model.a.w" stay whole: the wrapper-prefix
    # logic strips 'model.' where it is on every key and says so (--keep-prefix keeps it), as for other formats.
    paths = getattr(md, "planner_data", None) or {}
    nested = [k for k in tensor_keys if k.startswith("model.")
              and (not isinstance(paths.get(k), (tuple, list)) or len(paths[k]) > 1 and paths[k][0] == "model")]
    if nested:
        keys = {k: k[len("model."):] for k in nested}
        other = {k: "tensor" if k in tensor_keys else "bytes" for k in items if not k.startswith("model.")}
        notes.append("weights taken from entry 'model'")
    else:
        keys = {k: k for k in tensor_keys}
        other = {k: "bytes" for k in items if k not in keys}
    if not keys:
        raise CheckpointError(f"{directory}: the DCP state holds no tensors (entries: {', '.join(sorted(items)[:8])}); "
                              "is this a checkpoint of model weights?")

    def load_one(fqn: str, out: "torch.Tensor", region: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> None:
        try:
            planner = _dcp_region_planner(fqn, *region) if region is not None else None
            dcp_load({fqn: out}, storage_reader=SafeReader(directory), planner=planner, no_dist=True)
        except CheckpointError:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # DCP wraps reader errors in CheckpointException, a BaseException
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            if isinstance(cause, CheckpointError):
                raise cause from None
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{directory}: could not read {fqn!r} from the DCP checkpoint ({first}); "
                                  "a data file is missing or damaged") from None

    from ._dcp_stream import chunks_of, storage_index

    storage = storage_index(md)
    tensors = {name: DCPTensor(fqn, tuple(items[fqn].size), items[fqn].properties.dtype, load_one,
                               chunks_of(directory, md, storage, fqn))
               for fqn, name in keys.items()}
    files = sorted(directory.glob("*.distcp"))
    return Source(directory, "dcp", tensors, None, other, files, notes)


class DCPTensor:
    """One tensor of a DCP folder, read when asked (``TensorSource``).

    Its saved chunks' bytes are copied straight from the ``.distcp`` files into the destination (a tensor's
    memory by ``os.preadv``, an output file by ``os.copy_file_range``) when the block asked for is a run of
    whole rows covered by chunks of whole rows whose archive layout is proven (``_dcp_stream.plan_rows``);
    anything else goes through DCP's own reader (``_load``), which materialises each saved chunk it reads.
    """

    __slots__ = ("fqn", "shape", "dtype", "_load", "chunks")

    def __init__(self, fqn: str, shape: tuple[int, ...], dtype: "torch.dtype", load, chunks=()):
        self.fqn, self.shape, self.dtype, self._load, self.chunks = fqn, shape, dtype, load, list(chunks)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n

    def _plan(self, shape: tuple, offset: tuple):
        from ._dcp_stream import plan_rows

        return plan_rows(self.chunks, self.dtype, tuple(self.shape), tuple(shape), tuple(offset))

    def read(self, out: "torch.Tensor | None" = None) -> "torch.Tensor":
        import torch

        t = torch.empty(self.shape, dtype=self.dtype) if out is None or not out.is_contiguous() else out
        self._fill(t, tuple(self.shape), (0,) * len(self.shape), whole=True)
        if out is not None and out is not t:
            out.copy_(t)
            return out
        return t

    def read_block(self, dst: "torch.Tensor", shape: tuple, offset: tuple) -> None:
        """Fill ``dst`` (CPU, contiguous) with the block at ``offset`` of ``shape`` (one FSDP rank's shard):
        only the saved chunks that overlap it are read (a DCP saved by N ranks: about 1/N of the tensor), by
        their byte ranges when the block and chunks are whole rows, else through DCP's reader."""
        self._fill(dst, tuple(shape), tuple(offset), whole=False)

    def _fill(self, dst: "torch.Tensor", shape: tuple, offset: tuple, *, whole: bool) -> None:
        pieces = self._plan(shape, offset) if dst.is_cpu and dst.is_contiguous() else None
        if pieces is None:
            self._load(self.fqn, dst, None if whole else (offset, shape))
            return
        from ._safetensors_io import TensorSlice, read_slices

        flat = dst.view(-1) if dst.dim() else dst.view(1)
        row = flat.numel() // max(shape[0], 1) if shape else 1
        by_file: dict[Path, list] = {}
        for path, start, n, a, b in pieces:
            if n:
                by_file.setdefault(path, []).append((TensorSlice(path, start, n, "", ()), flat[a * row:b * row]))
        for path, items in by_file.items():
            read_slices(path, items)

    def identity(self) -> object:
        return id(self)

    def write_to(self, f) -> None:
        """Append the tensor's bytes to ``f``: chunk by chunk file to file when the layout is proven (no copy
        in memory), else the tensor read through DCP's reader."""
        pieces = self._plan(tuple(self.shape), (0,) * len(self.shape))
        if pieces is None:
            from ._safetensors_io import _byte_view

            f.write(_byte_view(self.read()))
            return
        from ._safetensors_io import copy_range

        f.flush()
        for path, start, n, _, _ in pieces:
            if n:
                with open(path, "rb", buffering=0) as src:
                    copy_range(src.fileno(), f, start, n, path)


def _dcp_region_planner(fqn: str, offset: tuple[int, ...], shape: tuple[int, ...]):
    """A DCP load planner whose only target is the block ``offset``/``shape`` of ``fqn`` (the state dict holds
    a tensor of that block's shape): DCP's resharding (``create_read_items_for_chunk_list``) then asks the
    reader only for the saved chunks that overlap the block."""
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class RegionPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=torch.Size(shape))
            return LoadPlan(create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk]))

        def lookup_tensor(self, index):  # the target is the block itself (read items index it by block offset)
            return self.state_dict[index.fqn]

    return RegionPlanner()


# ------------------------------------------------------------------------------------------ dispatch

def _read_directory(path: Path, *, ema: bool, allow_pickle: bool) -> Source:
    manifest_path = path / MANIFEST
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        if isinstance(manifest, dict) and manifest.get("format") == FORMAT_TAG and manifest.get("sharded"):
            from ._sharded import read_sharded  # one file per rank (CheckpointManager(sharded=True))

            if ema:  # its rank files hold the model's weights only; silently loading those would be wrong
                raise CheckpointError(f"{path}: a sharded entry holds the model's weights only, no EMA weights "
                                      "(--ema is refused with fsdp); drop ema / --ema")
            tensors = _with_aliases(read_sharded(path, manifest), manifest)  # tied: one source, several keys
            files = [path / n for n in manifest["sharded"]["files"]]
            return Source(path, "anytopo-sharded-ranks", tensors, manifest, {}, files,
                          [f"assembled from {len(files)} rank files (world {manifest['sharded']['world_size']})"])
        if isinstance(manifest, dict) and manifest.get("format") == FORMAT_TAG:
            weights = manifest.get("weights")
            if not weights:
                raise CheckpointError(f"{manifest_path}: lists no weights file; the checkpoint is damaged")
            src = read_source(path / weights, ema=ema, allow_pickle=allow_pickle)
            src.manifest = {**(src.manifest or {}), **manifest}
            src.tensors = _with_aliases(src.tensors, src.manifest)
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
        return _read_dcp(path)
    found = sorted(p.name for p in path.iterdir())[:8]
    raise CheckpointError(f"{path} is a directory but not a checkpoint (found: {', '.join(found) or 'nothing'}); "
                          "expected manifest.json, model.safetensors, pytorch_model.bin, *.index.json or a DCP "
                          ".metadata -- pass the checkpoint file or folder itself")


def read_source(path: str | Path, *, ema: bool = False, allow_pickle: bool = False) -> Source:
    """Detect the format of ``path`` and return its tensors lazily.

    Args:
        path: a checkpoint file or directory (see the module docstring for the formats).
        ema: take EMA weights (timm ``state_dict_ema``, torchvision ``model_ema``) instead of the model's.
        allow_pickle: allow whole pickled modules and other code-carrying pickles. Only for trusted files.

    Raises:
        CheckpointError: the path is missing, empty, damaged, not a checkpoint, or needs ``allow_pickle``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint: {path}; check the path")
    if path.is_dir():
        return _read_directory(path, ema=ema, allow_pickle=allow_pickle)
    if path.name == ".metadata":
        return _read_dcp(path.parent)
    if path.name.endswith(".index.json"):
        return _read_index(path, allow_pickle=allow_pickle)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the save was interrupted or the copy failed, "
                              "use an earlier checkpoint")
    kind = _sniff(path)
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

    Resolves a manager directory through its ``latest`` pointer (unverified; use
    ``CheckpointManager.latest()`` for the verified choice).
    """
    path = Path(path)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            m = read_json(path / MANIFEST)
            return m if isinstance(m, dict) and m.get("format") == FORMAT_TAG else None
        target = read_pointer(path / POINTER)
        return read_manifest(path / target) if target else None
    sidecar = path.with_name(path.name + ".manifest.json")
    if sidecar.is_file():
        return read_json(sidecar)
    if path.is_file() and _sniff(path) == "safetensors":
        return _manifest_from_metadata(read_header(path)[1])
    return None
