"""Streaming reader/writer for the safetensors file layout.

The ``safetensors`` package reads and writes whole dicts held in memory. anytopo needs two things it does
not offer: writing tensors one at a time (so ``convert`` of a multi-GB checkpoint keeps a small resident
set, and ``save`` writes straight from parameter memory with no staging copy), and reading each tensor
straight into its destination (a model parameter) with vectored reads from the page cache. The layout is
the published one: 8-byte little-endian header length, a JSON header (padded with spaces to 8 bytes),
then the raw little-endian tensor bytes. Files written here are read by ``safetensors`` and vice versa;
the tests check both directions.

Nothing here imports torch at module level: headers, dtype codes and file-to-file copies are plain Python,
so ``convert`` of safetensors checkpoints runs without torch (see ``checkpoint/__init__``); reading into
tensors imports it on first use.
"""
from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterable, Protocol

from ._pages import PageReleaser, libc_function
from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> (torch dtype name, bytes per element). Plain strings, so reading headers and
# converting safetensors files need no torch (see checkpoint/__init__: `convert` runs without importing it).
CODES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1), "C64": ("complex64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
CODE_OF_NAME: dict[str, str] = {name: code for code, (name, _) in CODES.items()}


@functools.cache
def torch_dtypes() -> dict[str, "torch.dtype"]:
    """safetensors code -> torch dtype (imports torch on first use)."""
    import torch

    return {code: getattr(torch, name) for code, (name, _) in CODES.items()}


_DTYPE_NAMES: dict = {}


def dtype_name(dtype: "torch.dtype") -> str:
    """``torch.float32`` -> ``"float32"`` (the names CODES uses); memoized, it runs once per tensor per save."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_IOV_MAX = 1024  # Linux's limit on buffers per preadv
_MAX_RUN = 1 << 30  # keep each preadv under the kernel's ~2 GiB per-call cap


class TensorSlice:
    """Where one tensor lives inside a safetensors file (a plain slotted class: ResNet-152 has ~900)."""

    __slots__ = ("path", "offset", "nbytes", "code", "shape")

    def __init__(self, path: Path, offset: int, nbytes: int, code: str, shape: tuple[int, ...]):
        self.path = path
        self.offset = offset  # absolute byte offset in the file
        self.nbytes = nbytes
        self.code = code  # safetensors dtype code, e.g. "F32"
        self.shape = shape

    def __repr__(self) -> str:
        return f"TensorSlice({self.path.name}@{self.offset}, {self.code}, {list(self.shape)})"

    @property
    def dtype(self) -> "torch.dtype":
        return torch_dtypes()[self.code]

    @property
    def dtype_name(self) -> str:
        return CODES[self.code][0]

    def read(self, out: "torch.Tensor | None" = None) -> "torch.Tensor":
        """Read the tensor into ``out`` (CPU, contiguous, same dtype and shape) or into a new tensor."""
        if out is None:
            import torch

            out = torch.empty(self.shape, dtype=self.dtype)
        read_slices(self.path, [(self, out)])
        return out

    def identity(self) -> object:
        """Equal for two sources that are the same bytes (see ``InMemory.identity``)."""
        return (str(self.path), self.offset, self.code, self.shape) if self.nbytes else id(self)

    def write_to(self, f: BinaryIO) -> None:
        """Copy this tensor's bytes into ``f`` file to file (``os.copy_file_range``: no user-space buffer,
        so converting keeps a flat resident set; a bounded read/write loop where that is unavailable)."""
        f.flush()
        with open(self.path, "rb", buffering=0) as src:
            copy_range(src.fileno(), f, self.offset, self.nbytes, self.path)


def _byte_view(t: "torch.Tensor") -> memoryview:
    """A flat byte view of a CPU contiguous tensor's memory, no copy (the caller keeps ``t`` alive)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray(0))
    arr = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    arr.owner = t  # the view keeps the tensor alive: a HashingFile may hash it after the write returns
    return memoryview(arr)


def read_slices(path: Path, items: "list[tuple[TensorSlice, torch.Tensor]]") -> None:
    """Read many slices of one file straight into their destination tensors (CPU, contiguous, right dtype).

    One open; slices in file order; each run of adjacent slices is filled by one ``os.preadv`` into the
    destinations' memory, so loading costs about one page-cache copy, like a raw read of the file.
    """
    items = sorted((it for it in items if it[0].nbytes), key=lambda it: it[0].offset)
    fd = os.open(path, os.O_RDONLY)
    try:
        i = 0
        while i < len(items):
            start = end = items[i][0].offset
            views: list[memoryview] = []
            while (i < len(items) and items[i][0].offset == end and len(views) < _IOV_MAX
                   and end - start < _MAX_RUN):
                views.append(_byte_view(items[i][1]))
                end += items[i][0].nbytes
                i += 1
            done = os.preadv(fd, views, start)
            if done < end - start:  # short read (rare: signals, runs over ~2 GiB): finish buffer by buffer
                offset = start
                for v in views:
                    pos = min(max(done - (offset - start), 0), len(v))
                    while pos < len(v):
                        n = os.preadv(fd, [v[pos:]], offset + pos)
                        if n == 0:
                            raise CheckpointError(f"{path}: file ended early (truncated?); re-copy it or use an "
                                                  "earlier checkpoint")
                        pos += n
                    offset += len(v)
    finally:
        os.close(fd)


def read_header(path: Path) -> tuple[dict[str, TensorSlice], dict[str, str]]:
    """Parse and validate a safetensors header. Returns (tensors by name, __metadata__)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes); the file is damaged")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file size {size}; "
                                  "the file is truncated or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e.msg}); the file is damaged") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object; the file is damaged")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    data_len = size - base
    tensors: dict[str, TensorSlice] = {}
    spans = []
    for name, info in header.items():
        try:
            code = info["dtype"]
            itemsize = CODES[code][1]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            numel = math.prod(shape)
            if not (type(begin) is int and type(end) is int and type(numel) is int):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: bad header entry for tensor {name!r}; the file is damaged "
                                  "or uses a dtype anytopo does not know") from None
        if end - begin != numel * itemsize or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} "
                                  f"{info['dtype']}; the file is damaged")
        if end > data_len:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {base + end} but the file has "
                                  f"{size} bytes; the save or copy was interrupted, re-copy it or use an earlier checkpoint")
        spans.append((begin, end))
        tensors[name] = TensorSlice(path, base + begin, end - begin, code, shape)
    spans.sort()
    for (b0, e0), (b1, _) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors overlap in the data section; the file is damaged")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def plan_header(items: Iterable[tuple[str, str, tuple[int, ...]]],
                metadata: dict[str, str] | None) -> tuple[bytes, list[int]]:
    """Build the header bytes for (name, dtype name, shape) written in the given order; returns (header, byte sizes)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    sizes = []
    offset = 0
    for name, dtype, shape in items:  # ~1000 entries for big models: keep the loop lean
        code = CODE_OF_NAME.get(dtype)
        if code is None:
            raise CheckpointError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store; "
                                  "cast it or save as .pth")
        nbytes = math.prod(shape) * CODES[code][1]
        # plain lists: json encodes them about twice as fast as torch.Size (a tuple subclass)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        sizes.append(nbytes)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


class TensorSource(Protocol):
    """One tensor of a checkpoint, produced on demand: a slice of a file, or a tensor in memory.

    ``dtype_name``/``shape``/``nbytes`` and ``write_to`` need no torch; ``dtype`` and ``read`` may import it.
    """

    shape: tuple[int, ...]
    nbytes: int

    @property
    def dtype_name(self) -> str: ...

    @property
    def dtype(self) -> "torch.dtype": ...

    def read(self, out: "torch.Tensor | None" = None) -> "torch.Tensor": ...

    def identity(self) -> object: ...

    def write_to(self, f: BinaryIO) -> None: ...


@dataclass(frozen=True)
class InMemory:
    """A tensor already in memory, seen through the ``TensorSource`` interface."""

    tensor: "torch.Tensor"

    @property
    def dtype(self) -> "torch.dtype":
        return self.tensor.dtype

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.tensor.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor.shape  # a torch.Size, which is a tuple

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def read(self, out: "torch.Tensor | None" = None) -> "torch.Tensor":
        if out is None:
            return self.tensor
        return out.copy_(self.tensor)

    def identity(self) -> object:
        """Equal for two sources that are the same memory: tied weights loaded from a file are often two
        tensor objects over one storage (``state_dict()`` detaches each entry), not one object."""
        t = self.tensor
        if not t.numel():
            return id(self)
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)

    def write_to(self, f: BinaryIO) -> None:
        t = self.tensor
        f.write(_byte_view(t if t.is_contiguous() else t.contiguous()))


@dataclass(frozen=True)
class MappedInMemory(InMemory):
    """A tensor inside a file mapping (``torch.load(mmap=True)``) whose pages are reclaimed once written.

    ``write_to`` is its last use in ``convert``; releasing the pages right after it is what keeps
    converting a ``.pth`` streaming (see ``_pages``).
    """

    pages: "PageReleaser"

    def write_to(self, f: BinaryIO) -> None:
        super().write_to(f)
        self.pages.release(self.tensor)


_COPY_CHUNK = 8 << 20


def copy_range(src_fd: int, f: BinaryIO, offset: int, n: int, path: Path) -> None:
    """Append ``n`` bytes of file ``src_fd`` from ``offset`` to ``f`` (flushed by the caller).

    ``os.copy_file_range`` copies inside the kernel; where it is missing or refused (another platform, an
    old kernel across filesystems, a target with no descriptor) a read/write loop of 8 MiB pieces does it.
    """
    try:
        dst_fd = f.fileno()
        copy = os.copy_file_range
    except (AttributeError, OSError, ValueError):
        dst_fd, copy = -1, None
    while n > 0 and copy is not None:
        try:
            k = copy(src_fd, dst_fd, min(n, 1 << 30), offset)
        except OSError:
            break  # EXDEV/ENOSYS/EINVAL...: the loop below does the rest
        if k == 0:
            break  # end of file, or a filesystem that copies nothing this way: the loop below tells which
        offset += k
        n -= k
    while n > 0:
        piece = os.pread(src_fd, min(n, _COPY_CHUNK), offset)
        if not piece:
            raise CheckpointError(f"{path}: file ended early (truncated?); re-copy it or use an earlier checkpoint")
        f.write(piece)
        offset += len(piece)
        n -= len(piece)


_sync_file_range = libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait for it
WRITEBACK_CHUNK = 32 << 20


class EarlyWriteback:
    """Start the disk writing each ``WRITEBACK_CHUNK`` bytes of a file while the rest is still being copied.

    A durable save is copy-into-page-cache then ``fsync``; left alone, the kernel starts writing only at
    the fsync, so the two run one after the other. Asking for writeback of each finished chunk
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait) overlaps them; the final ``fsync`` is
    still what makes the file durable and still runs. Measured on the reference VM: a 241 MB durable write
    takes ~0.8x the time (docs/performance.md). Advisory only: a file object with no descriptor, a
    platform without the call or a filesystem that refuses it just skips it.
    """

    __slots__ = ("f", "fd", "start", "pos")

    def __init__(self, f: BinaryIO, pos: int = 0):
        self.f = f
        self.start = self.pos = pos
        try:
            self.fd = f.fileno() if _sync_file_range is not None else -1
        except (AttributeError, OSError, ValueError):  # BytesIO and friends
            self.fd = -1

    def advance(self, n: int) -> None:
        self.pos += n
        if self.fd >= 0 and self.pos - self.start >= WRITEBACK_CHUNK:
            self.f.flush()
            if _sync_file_range(self.fd, self.start, self.pos - self.start, _SYNC_FILE_RANGE_WRITE) != 0:
                self.fd = -1  # EINVAL/ESPIPE etc.: not a regular file on a filesystem that supports it
            self.start = self.pos


def write_file(f: BinaryIO, entries: list[tuple[str, TensorSource]], metadata: dict[str, str] | None) -> int:
    """Write a safetensors file, one entry at a time, each straight from where it is.

    In-memory CPU contiguous tensors are written from their memory with no copy; slices of other files are
    copied file to file; only one entry is ever staged, which is what keeps ``convert`` streaming.
    Writeback to disk starts chunk by chunk while later entries are still being written
    (``EarlyWriteback``). Returns the number of bytes written.
    """
    header, sizes = plan_header([(k, e.dtype_name, e.shape) for k, e in entries], metadata)
    f.write(header)
    wb = EarlyWriteback(f, len(header))
    for (_, e), n in zip(entries, sizes):
        if n:
            e.write_to(f)
            wb.advance(n)
    return len(header) + sum(sizes)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
