"""torch.distributed.checkpoint (DCP) folders as a ``Source``: ``read_dcp(directory)``.

Only ``.metadata`` is read up front, by an unpickler that rebuilds DCP's plain metadata classes and nothing
else; each tensor is read on demand (``DCPTensor``), one at a time.

Reading DCP tensors straight from the ``.distcp`` storage files, when their layout can be proven:

torch's ``FileSystemWriter`` (torch 2.x, the default ``torch_save`` serialization) writes each saved chunk of a
tensor as one ``torch.save`` archive appended to a ``.distcp`` file; ``.metadata`` records where
(``_StorageInfo``: relative path, offset, length, transform descriptors). The archive is a zip whose records
are stored uncompressed: ``<prefix>/data.pkl`` (a small pickle that rebuilds the tensor from a storage,
offset, size and stride) and ``<prefix>/data/<key>`` (the storage's raw bytes). DCP's own reader
``torch.load``s the whole archive for every chunk it reads, so a reader holds each saved chunk in memory once
more before copying it. Here the chunk's raw bytes are located instead and copied from the file into their
destination (a parameter's memory with ``os.preadv``, the output file with ``os.copy_file_range``), so no
copy of a tensor is ever held.

Only a layout proven from the bytes is read this way (``chunk_data_offset``): no transform descriptors, the
archive's records all stored (not compressed, not encrypted), byte order ``little`` on a little-endian
machine, exactly one storage record whose size is the chunk's ``numel * itemsize``, and a ``data.pkl`` that
rebuilds one plain tensor of that storage at offset 0 with the chunk's shape, contiguous strides and dtype.
``data.pkl`` is parsed by an unpickler that rebuilds nothing of torch's: it records the arguments of
``_rebuild_tensor_v2`` and refuses every other callable. Anything else (another writer, a compressed or
non-contiguous item, a damaged archive) makes the caller use DCP's reader, which is kept for that.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, first_line
from .safetensors_io import TensorSlice, byte_view, copy_range, read_slices
from .sources import Source

if TYPE_CHECKING:
    import torch

_MAX_PICKLE = 1 << 20  # a single tensor's data.pkl is ~150 bytes; anything large is not what torch.save writes


class _Window(io.RawIOBase):
    """The bytes ``[start, start + length)`` of an open file as a seekable read-only file (for ``zipfile``)."""

    def __init__(self, fd: int, start: int, length: int):
        super().__init__()
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        data = os.pread(self.fd, n, self.start + self.pos) if n else b""
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


class _Rebuild:
    """What ``torch._utils._rebuild_tensor_v2(...)`` was called with in a data.pkl (nothing is rebuilt)."""

    def __init__(self, *args: Any):
        self.args = args


class _StorageType:
    def __init__(self, dtype: Any):
        self.dtype = dtype


class _TensorPickle(pickle.Unpickler):
    """Reads a torch.save data.pkl of one tensor as plain values; every callable but the two below is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _Rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name.endswith("Storage"):
            import torch

            with warnings.catch_warnings():  # the legacy storage classes warn that TypedStorage is deprecated
                warnings.simplefilter("ignore")
                cls = getattr(torch, name, None)
                dtype = getattr(cls, "dtype", None)
            if isinstance(cls, type) and isinstance(dtype, torch.dtype):
                return _StorageType(dtype)  # a marker; the storage class itself is never called
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain tensor's data.pkl")

    def persistent_load(self, pid: Any) -> Any:
        return ("persistent", tuple(pid) if isinstance(pid, tuple) else pid)


def _contiguous_strides(sizes: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for s in reversed(sizes):
        strides.append(step)
        step *= max(s, 1)
    return tuple(reversed(strides))


def chunk_data_offset(path: Path, offset: int, length: int, dtype: Any, sizes: tuple[int, ...],
                      transforms: Any = None) -> int | None:
    """The absolute offset in ``path`` of the raw bytes of a saved chunk (``sizes`` of ``dtype``) whose
    ``torch.save`` archive occupies ``[offset, offset + length)``, or None when the layout is not proven to
    be the one described in the module docstring (the caller then reads the chunk through DCP's reader)."""
    if transforms or sys.byteorder != "little" or offset < 0 or length <= 0:
        return None
    nbytes = dtype.itemsize
    for s in sizes:
        nbytes *= s
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size < offset + length:
            return None
        with zipfile.ZipFile(_Window(fd, offset, length)) as z:
            infos = z.infolist()
            if any(i.compress_type != zipfile.ZIP_STORED or i.flag_bits & 0x1 or i.file_size != i.compress_size
                   for i in infos):
                return None
            pkls = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
            if len(pkls) != 1 or pkls[0].file_size > _MAX_PICKLE:
                return None
            prefix = pkls[0].filename[:-len("data.pkl")]
            if z.read(prefix + "byteorder") != b"little":
                return None
            records = [i for i in infos if i.filename.startswith(prefix + "data/")]
            if len(records) != 1 or records[0].file_size != nbytes:
                return None
            rebuilt = _TensorPickle(io.BytesIO(z.read(pkls[0]))).load()
            if not _plain_tensor(rebuilt, records[0].filename[len(prefix + "data/"):], dtype, sizes, nbytes):
                return None
            record = records[0]
        head = os.pread(fd, 30, offset + record.header_offset)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        start = record.header_offset + 30 + name_len + extra_len
        if start + nbytes > length:
            return None
        return offset + start
    except (zipfile.BadZipFile, KeyError, pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
            AttributeError, OSError, struct.error, RecursionError, MemoryError):
        return None
    finally:
        os.close(fd)


def _plain_tensor(rebuilt: Any, key: str, dtype: Any, sizes: tuple[int, ...], nbytes: int) -> bool:
    """Whether data.pkl rebuilds exactly one plain, contiguous tensor of storage ``key`` at offset 0 with the
    chunk's shape and dtype (the ``_rebuild_tensor_v2`` arguments torch.save writes)."""
    if not isinstance(rebuilt, _Rebuild) or len(rebuilt.args) not in (6, 7):
        return False
    storage, storage_offset, size, stride, _requires_grad, hooks, *rest = rebuilt.args
    if rest and rest[0]:  # tensor metadata (e.g. a subclass's): not a plain tensor
        return False
    if hooks or storage_offset != 0 or tuple(size) != tuple(sizes):
        return False
    if tuple(stride) != _contiguous_strides(tuple(sizes)):
        return False
    if not (isinstance(storage, tuple) and len(storage) == 2 and storage[0] == "persistent"):
        return False
    pid = storage[1]
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
        return False
    _, stype, skey, location, numel = pid
    return (stype.dtype == dtype and skey == key and location == "cpu" and isinstance(numel, int)
            and numel * dtype.itemsize == nbytes)


class DCPChunk:
    """One saved chunk of a DCP tensor: where it sits in the tensor and where its archive is; the raw bytes'
    offset is proven once, on first use (``data_offset``)."""

    __slots__ = ("offsets", "sizes", "path", "offset", "length", "transforms", "_data")

    def __init__(self, offsets: tuple[int, ...], sizes: tuple[int, ...], path: Path | None, offset: int,
                 length: int, transforms: Any):
        self.offsets, self.sizes = offsets, sizes
        self.path, self.offset, self.length, self.transforms = path, offset, length, transforms
        self._data: int | None | bool = False  # False: not proven yet

    def data_offset(self, dtype: Any) -> int | None:
        if self._data is False:
            self._data = None if self.path is None else chunk_data_offset(
                self.path, self.offset, self.length, dtype, self.sizes, self.transforms)
        return self._data


def storage_index(md: Any) -> dict[tuple[str, tuple[int, ...] | None], Any]:
    """DCP metadata's ``storage_data`` keyed by (fqn, chunk offsets): how ``MetadataIndex`` compares."""
    storage = {}
    for index, info in (getattr(md, "storage_data", None) or {}).items():
        off = getattr(index, "offset", None)
        storage[(getattr(index, "fqn", None), tuple(off) if off is not None else None)] = info
    return storage


def chunks_of(directory: Path, md: Any, storage: dict, fqn: str) -> list[DCPChunk]:
    """The saved chunks of tensor ``fqn`` in DCP metadata ``md`` with their storage info (``storage_index``).
    A chunk whose storage entry is missing or odd, or names a file outside ``directory``, gets ``path=None``:
    it is never read directly."""
    out = []
    for c in md.state_dict_metadata[fqn].chunks:
        offsets, sizes = tuple(c.offsets), tuple(c.sizes)
        info = storage.get((fqn, offsets))
        rel = getattr(info, "relative_path", None)
        ok = (isinstance(rel, str) and rel not in ("", ".", "..") and "/" not in rel and "\\" not in rel
              and isinstance(getattr(info, "offset", None), int) and isinstance(getattr(info, "length", None), int))
        out.append(DCPChunk(offsets, sizes, directory / rel, info.offset, info.length,
                            getattr(info, "transform_descriptors", None)) if ok
                   else DCPChunk(offsets, sizes, None, 0, 0, None))
    return out


def plan_rows(chunks: list[DCPChunk], dtype: Any, shape: tuple[int, ...], block_shape: tuple[int, ...],
              block_offset: tuple[int, ...]) -> list[tuple[Path, int, int, int, int]] | None:
    """Byte ranges that fill the block ``block_offset``/``block_shape`` of a tensor of ``shape`` from its
    saved chunks, in block order: ``(path, file offset, nbytes, first row, end row)`` with rows relative to
    the block. Only for a block of whole rows (what FSDP shards: dim 0) covered exactly by chunks of whole
    rows whose layout is proven; None otherwise (the caller reads through DCP's reader)."""
    if len(block_shape) != len(shape) or len(block_offset) != len(shape):
        return None
    if not shape:  # a 0-dim tensor: one chunk, one element
        if len(chunks) != 1 or chunks[0].sizes != ():
            return None
        start = chunks[0].data_offset(dtype)
        return None if start is None else [(chunks[0].path, start, dtype.itemsize, 0, 1)]
    if tuple(block_shape[1:]) != tuple(shape[1:]) or any(block_offset[1:]):
        return None
    row_bytes = dtype.itemsize
    for s in shape[1:]:
        row_bytes *= s
    r0, r1 = block_offset[0], block_offset[0] + block_shape[0]
    pieces = []
    for c in chunks:
        if len(c.sizes) != len(shape):
            return None
        c0, c1 = c.offsets[0], c.offsets[0] + c.sizes[0]
        a, b = max(r0, c0), min(r1, c1)
        if a >= b:
            continue  # does not overlap the block: never opened
        if tuple(c.sizes[1:]) != tuple(shape[1:]) or any(c.offsets[1:]):
            return None  # sharded along another dim: not a run of whole rows
        if row_bytes == 0:
            pieces.append((c.path, 0, 0, a - r0, b - r0))
            continue
        start = c.data_offset(dtype)
        if start is None:
            return None
        pieces.append((c.path, start + (a - c0) * row_bytes, (b - a) * row_bytes, a - r0, b - r0))
    pieces.sort(key=lambda p: p[3])
    row = 0
    for p in pieces:  # exactly tiled: no gap, no overlap, every row of the block
        if p[3] != row:
            return None
        row = p[4]
    return pieces if row == r1 - r0 else None


# ------------------------------------------------------------------------------------------- reader

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


def read_dcp(directory: Path) -> Source:
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
    # raw bytes straight from the .distcp files where their layout is proven (``plan_rows`` above),
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
    whole rows covered by chunks of whole rows whose archive layout is proven (``plan_rows``);
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
            f.write(byte_view(self.read()))
            return
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
