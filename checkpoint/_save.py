"""Write canonical checkpoints: CPU, contiguous, bare keys, a manifest, atomically.

Layouts written by ``save(obj, path)``:
- ``path`` ends in ``.safetensors``: one safetensors file; the manifest (without hashes) rides in its
  ``__metadata__`` so a lone copied file keeps its provenance.
- ``path`` ends in ``.pth``/``.pt``/``.pkl``/``.bin``: a plain dict of tensors (``torch.load(...,
  weights_only=True)`` then ``model.load_state_dict`` works in any code), manifest beside it as
  ``<name>.manifest.json``.
- any other ``path``: a directory with ``model.safetensors`` (or shards ``model-00001-of-0000N.safetensors``
  plus ``model.safetensors.index.json``) and ``manifest.json`` holding the sha256 of every data file.

Every file is written to a temporary name in the same directory, flushed, fsynced and ``os.replace``d;
a directory is built under a temporary name and renamed into place with its manifest written last. A
crash never leaves something that looks complete. In a distributed run global rank 0 creates, renames and
describes every file and every rank learns the outcome before returning; the ranks of a sharded (FSDP2) model
also write their own rows into rank 0's files where they can open them (``_sharded.GatherPlan``).
"""
from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, Mapping

from ._safetensors_io import InMemory, TensorSource, fsync_dir, plan_header, write_file
from .errors import CheckpointError
from .formats import FORMAT_TAG, MANIFEST, group_tied, sha256_file
from .keys import strip_common_wrappers

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch is imported inside the functions that handle tensors: `convert` between safetensors layouts runs
# through write_checkpoint/build_manifest without it (see checkpoint/__init__).

FORMAT_VERSION = 1
TORCH_SUFFIXES = (".pth", ".pt", ".pkl", ".bin")
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------- atomic primitives

def _umask() -> int:
    """The process umask, read without changing it where /proc tells it (os.umask can only set)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_HASH_MODE = threading.local()
INLINE_HASH_CHUNK = 4 << 20
"""Bytes hashed then written at a time by an inline ``HashingFile``: small enough to stay in the CPU cache
between the hash and the kernel's copy into the page cache."""


@contextmanager
def inline_hashing() -> Iterator[None]:
    """Within this block, on this thread, ``HashingFile``s hash in the writing thread, a cache-sized piece at a
    time just before writing it, instead of in a helper thread. For writes nobody waits for (async saves):
    there the helper thread only adds a third runnable thread beside training and the writer, and a second
    pass of every byte through memory, which slows the training they run beside."""
    before = getattr(_HASH_MODE, "inline", False)
    _HASH_MODE.inline = True
    try:
        yield
    finally:
        _HASH_MODE.inline = before


class HashingFile:
    """A file object that also computes the sha256 of what is written through it, in a helper thread.

    ``hashlib`` releases the GIL on large buffers, so hashing one chunk runs while the next is copied into
    the page cache and while the final fsync waits on the disk: a manifest's hashes cost (almost) nothing
    on top of the write, instead of a second pass over the finished file. Only bytes passed to ``write``
    are hashed; the caller must keep every buffer alive until ``hexdigest`` (``_byte_view`` ties each
    view to its tensor). Inside :func:`inline_hashing` it hashes on the writing thread instead.
    """

    def __init__(self, f: BinaryIO):
        import hashlib
        import queue

        self.f = f
        self._sha = hashlib.sha256()
        self._digest: str | None = None
        self._thread: threading.Thread | None = None
        if not getattr(_HASH_MODE, "inline", False):
            self._queue: queue.SimpleQueue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._sha.update(chunk)

    def write(self, data: Any) -> int:
        if self._thread is not None:
            n = self.f.write(data)
            self._queue.put(data)
            return n
        view = memoryview(data).cast("B")
        n = 0
        for start in range(0, len(view), INLINE_HASH_CHUNK):
            piece = view[start:start + INLINE_HASH_CHUNK]
            self._sha.update(piece)
            n += self.f.write(piece)
        return n

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def hexdigest(self) -> str:
        if self._digest is None:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
            self._digest = self._sha.hexdigest()
        return self._digest


@contextmanager
def atomic_file(path: Path, *, sha256: bool = False) -> Iterator[Any]:
    """Open a temp file beside ``path``; on success flush+fsync+rename over ``path``, else delete it.

    The file gets the mode a plain ``open`` would (0666 less the umask), not mkstemp's 0600. With
    ``sha256`` the yielded file is a ``HashingFile``; its ``hexdigest()`` is valid after the block. The
    yielded file's ``temp_path`` is the temporary name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    hashing = None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as raw:
            f = hashing = HashingFile(raw) if sha256 else None
            (f or raw).temp_path = tmp  # for writers that open it again (every rank of a sharded model)
            yield f or raw
            raw.flush()
            os.fsync(raw.fileno())
        if hashing is not None:
            hashing.hexdigest()  # joined after the fsync, which it overlapped
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if hashing is not None:
            hashing.hexdigest()  # stop the helper thread
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text.encode())


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Build a directory under a temp name beside ``path``, then rename it into place.

    An existing ``path`` is moved aside first and removed only once the new one is in place, so at every
    instant either the old or the new complete directory exists (plus, at worst, a leftover temp). The
    directory gets the mode a plain ``mkdir`` would (0777 less the umask), not mkdtemp's 0700.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------- canonical form

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


def canonical_state(obj: nn.Module | Mapping[str, torch.Tensor], *,
                    to_cpu: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """CPU, contiguous tensors under bare keys, plus what was learned about the source (for the manifest).

    ``to_cpu=False`` leaves each tensor where and as it is (detached): for a caller that copies them into
    buffers of its own (the asynchronous save's snapshot), so a GPU tensor is not copied twice."""
    import torch
    from torch import nn

    from ._unwrap import describe_wrapping, unwrap

    info: dict[str, Any] = {}
    if isinstance(obj, nn.Module):
        wrappers = describe_wrapping(obj)
        bare = unwrap(obj)
        sd = bare.state_dict(keep_vars=True)  # detached once below, not twice
        info["wrappers"] = wrappers
        try:
            info["device_type"] = next(iter(bare.parameters())).device.type
        except StopIteration:
            info["device_type"] = "cpu"
    elif isinstance(obj, Mapping):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"state dict entries {sorted(map(str, bad))[:5]} are not tensors; save only tensors "
                                  "(put step/epoch/config in metadata=)")
        sd, stripped = strip_common_wrappers(obj)
        if stripped:
            info["prefix_stripped"] = stripped
        types = {v.device.type for v in sd.values()}
        info["device_type"] = types.pop() if len(types) == 1 else "mixed"
    else:
        raise CheckpointError(f"save() takes an nn.Module or a state dict, not {type(obj).__name__}")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        t = v.detach()
        if not to_cpu:
            out[k] = t
            continue
        if not t.is_cpu:
            t = t.cpu()
        out[k] = t if t.is_contiguous() else t.contiguous()
    return out, info


def dedupe(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that are the same memory (tied weights) once: returns (unique tensors, alias -> stored key).

    Ties are what ``formats.group_tied`` says they are. Stored tensors that merely overlap in memory
    (views of one storage that are not the same tensor) are cloned so every stored tensor owns its bytes;
    only storages shared by several stored entries are examined (the common case costs one lookup).
    """
    stored, aliases = group_tied({k: InMemory(t) for k, t in sd.items()})
    unique = {k: s.tensor for k, s in stored.items()}
    by_storage: dict[int, list[str]] = {}
    for k, t in unique.items():
        if t.numel():
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(k)
    for keys in by_storage.values():
        if len(keys) == 1:  # alone in its storage: overlaps nothing
            continue
        spans: list[tuple[int, int]] = []
        for k in keys:
            t = unique[k]
            start = t.storage_offset() * t.element_size()
            end = start + t.numel() * t.element_size()
            if any(s < end and start < e for s, e in spans):
                unique[k] = t.clone()
            else:
                spans.append((start, end))
    return unique, aliases


@functools.cache
def _versions() -> dict[str, str]:
    """Library versions for the manifest (package metadata lookups take ~1 ms each: once per process)."""
    from . import __version__

    def dist_version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {"anytopo": __version__, "torch": _torch_version() or dist_version("torch"),
            "safetensors": dist_version("safetensors"), "python": platform.python_version()}


def _torch_version() -> str | None:
    """torch.__version__ with its build tag (e.g. 2.14.1+cu130), without importing torch.

    Package metadata may lack the tag; torch's generated ``torch/version.py`` has it. Read as text.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.__version__
    for entry in sys.path:
        version_py = Path(entry or ".") / "torch" / "version.py"
        try:
            m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", version_py.read_text(), re.MULTILINE)
        except OSError:
            continue
        return m.group(1) if m else None
    return None


def _process_group():
    """torch.distributed if a process group is up, else None (never imports torch: no torch, no group)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _topology(info: dict[str, Any]) -> dict[str, Any]:
    dist = _process_group()
    world = dist.get_world_size() if dist is not None else 1
    wrappers = info.get("wrappers") or []
    if "FSDP" in wrappers or info.get("sharded_state_dict"):
        strategy = "fsdp"
    elif "DistributedDataParallel" in wrappers:
        strategy = "ddp"
    elif "DataParallel" in wrappers:
        strategy = "dp"
    else:
        strategy = "ddp" if world > 1 else "single"
    topology = {"strategy": strategy, "world_size": world, "device_type": info.get("device_type", "cpu"),
                "wrappers": wrappers}
    if info.get("buffers"):
        topology["buffers"] = info["buffers"]  # whose BatchNorm statistics these are (rank 0's)
    return topology


def _check_json(metadata: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(metadata), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"metadata must be plain JSON values (str, int, float, bool, None, lists, dicts): {e}; "
                              "convert objects such as argparse.Namespace with vars()") from None


def build_manifest(sources: Mapping[str, TensorSource], aliases: Mapping[str, str], info: dict[str, Any],
                   metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The manifest: provenance and shape of a checkpoint, as plain JSON (never a pickled object)."""
    meta = _check_json(metadata or {})
    dtypes: dict[str, int] = {}
    numel = nbytes = 0
    for t in sources.values():
        name = t.dtype_name
        dtypes[name] = dtypes.get(name, 0) + 1
        n = math.prod(t.shape)
        numel += n
        nbytes += t.nbytes
    topology = {**_topology(info), **meta.pop("topology", {})}
    manifest: dict[str, Any] = {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": meta.pop("model", None),
        "model_options": meta.pop("model_options", None),
        "step": meta.pop("step", None),
        "epoch": meta.pop("epoch", None),
        "topology": topology,
        "dtypes": dtypes,
        "num_tensors": len(sources) + len(aliases),
        "num_elements": numel,
        "total_bytes": nbytes,
        "aliases": dict(aliases),
        "versions": dict(_versions()),
    }
    if "prefix_stripped" in info:
        manifest["prefix_stripped"] = info["prefix_stripped"]
    if meta:
        manifest["extra"] = meta
    return manifest


def _st_metadata(manifest: Mapping[str, Any]) -> dict[str, str]:
    slim = {k: v for k, v in manifest.items() if k not in ("files", "weights")}
    return {"format": "pt", FORMAT_TAG: json.dumps(slim, separators=(",", ":"))}


# ------------------------------------------------------------------------------------------- writers

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
    from ._sharded import common_plan

    inline = digests is not None and all(type(e) is InMemory for _, e in entries)
    metadata = _st_metadata(manifest)
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
                index = {"metadata": {"total_size": manifest["total_bytes"], **_st_metadata(manifest)},
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


def is_writer() -> bool:
    """True where checkpoint files are written: the only process, or global rank 0."""
    dist = _process_group()
    return dist is None or dist.get_rank() == 0


def barrier() -> None:
    dist = _process_group()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def save(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | Path, *,
         metadata: Mapping[str, Any] | None = None, max_shard_size: int | str | None = None,
         format: str | None = None) -> Path:
    """Save a model (any wrapping) or a state dict as a canonical, device-agnostic checkpoint.

    Args:
        model_or_state_dict: a bare, DataParallel, DDP or compiled model (unwrapped by structure), or a
            state dict (a common ``module.``/``_orig_mod.`` prefix on every key is removed).
        path: ``x.safetensors`` (default format), ``x.pth``/``.pt``/``.pkl``/``.bin``, or a directory.
        metadata: plain JSON values; ``model``, ``model_options``, ``step``, ``epoch`` and ``topology``
            become manifest fields, anything else goes under ``extra``.
        max_shard_size: e.g. ``"2GB"``; directories only. Shards follow the HF index layout.
        format: ``"safetensors"`` or ``"pth"`` for directory targets.

    Returns:
        The path written. In a distributed run every rank must call this; rank 0 writes (with a sharded
        model every rank writes its own rows into rank 0's file), all learn the outcome.

    Example:
        >>> checkpoint.save(ddp_model, "run/final.safetensors", metadata={"model": "resnet18", "step": 100})
    """
    path = Path(path)

    def write(entries: dict[str, TensorSource], aliases: dict[str, str], info: dict[str, Any]) -> None:
        manifest = build_manifest(entries, aliases, info, metadata)
        write_checkpoint(path, list(entries.items()), manifest, max_shard_size=max_shard_size, fmt=format)

    write_collectively(model_or_state_dict, write, path)
    return path


def write_collectively(obj: nn.Module | Mapping[str, torch.Tensor], write, path: Path, *,
                       to_cpu: bool = True) -> None:
    """Run ``write(entries, aliases, info)`` on the writer (global rank 0) with ``obj``'s canonical tensors;
    every rank must call this (``to_cpu=False``: an unsharded model's tensors are handed over where they
    are, see ``canonical_state``). A sharded model (FSDP2, DTensors) is written while the writer writes its
    files: every rank writes its own rows into each file where it can open it, else streams them to the
    writer, tensor by tensor (``_sharded.GatherPlan``); then all ranks learn the writer's outcome and
    raise if it failed (``_sharded.agree``), so no rank reports a checkpoint that was not written.
    """
    from . import _sharded

    error: BaseException | None = None
    sd = None
    info: dict[str, Any] = {}
    from torch import nn

    if isinstance(obj, nn.Module):
        from ._unwrap import describe_wrapping, unwrap

        bare = unwrap(obj)
        buffers = _sharded.buffer_agreement(bare)  # collective: before anything can fail on one rank only
        if buffers is not None:
            info["buffers"] = buffers
        if _sharded.is_sharded_state(dict(bare.named_parameters())):
            sd = bare.state_dict(keep_vars=True)
            info.update(wrappers=describe_wrapping(obj), device_type=_first_device_type(bare))
    elif isinstance(obj, Mapping) and _sharded.is_sharded_state(obj):
        sd = dict(obj)
        info.update(wrappers=[], device_type=_first_device_type(None, sd), sharded_state_dict=True)
    if sd is not None:
        entries, aliases, plan = _sharded.sharded_plan(sd)
        if is_writer():
            try:
                write(entries, aliases, info)
            except Exception as e:  # noqa: BLE001 -- told to every rank by agree()
                error = e
            plan.finish()
        else:
            plan.serve()  # rank 0's commands: write this rank's rows into its file, or stream them to it
    elif is_writer():
        try:
            sd_cpu, found = canonical_state(obj, to_cpu=to_cpu)
            unique, aliases = dedupe(sd_cpu)
            write({k: InMemory(t) for k, t in unique.items()}, aliases, {**found, **info})
        except Exception as e:  # noqa: BLE001
            error = e
    _sharded.agree(error, path)


def _first_device_type(module, sd=None) -> str:
    tensors = iter(module.parameters()) if module is not None else iter(sd.values())
    first = next(tensors, None)
    return first.device.type if first is not None else "cpu"
