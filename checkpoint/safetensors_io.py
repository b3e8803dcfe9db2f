"""Streaming reader/writer for the safetensors file layout.

The ``safetensors`` package reads and writes whole dicts held in memory. anytopo needs two things it does
not offer: writing tensors one at a time (so ``convert`` of a multi-GB checkpoint keeps a small resident
set, and ``save`` writes straight from parameter memory with no staging copy), and reading each tensor
straight into its destination (a model parameter) with vectored reads from the page cache. The layout is
the published one: 8-byte little-endian header length, a JSON header (padded with spaces to 8 bytes),
then the raw little-endian tensor bytes. Which headers are valid is the installed ``safetensors``' call:
its own parser validates every header before anything here reads it. Files written here are read by
``safetensors`` and vice versa, bit for bit, for every dtype it can write (tests/test_ckpt_conformance.py).

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterable, Iterator, Protocol

from .errors import CheckpointError
from .objstore import READ_RUN, is_url
from .storage import durable, libc_function

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> (torch dtype name, bytes per torch element, header elements per torch element).
# safetensors keeps its own table in safetensors.torch, which imports torch; reading headers and converting
# safetensors files must not (see checkpoint/__init__: `convert` runs without it), so the table is written
# out here and tests/test_ckpt_conformance.py checks it against the installed library for every dtype it
# can write (names and sizes from safetensors.torch._SIZE, codes and packing from safetensors.TensorSpec).
# Packed dtypes: the header's shape counts the packed values, torch's counts bytes (F4: two per byte).
CODES: dict[str, tuple[str, int, int]] = {
    "BOOL": ("bool", 1, 1), "U8": ("uint8", 1, 1), "I8": ("int8", 1, 1),
    "I16": ("int16", 2, 1), "U16": ("uint16", 2, 1), "F16": ("float16", 2, 1), "BF16": ("bfloat16", 2, 1),
    "I32": ("int32", 4, 1), "U32": ("uint32", 4, 1), "F32": ("float32", 4, 1),
    "I64": ("int64", 8, 1), "U64": ("uint64", 8, 1), "F64": ("float64", 8, 1), "C64": ("complex64", 8, 1),
    "F8_E4M3": ("float8_e4m3fn", 1, 1), "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1, 1),
    "F8_E5M2": ("float8_e5m2", 1, 1), "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1, 1),
    "F8_E8M0": ("float8_e8m0fnu", 1, 1), "F4": ("float4_e2m1fn_x2", 1, 2),
}
CODE_OF_NAME: dict[str, str] = {name: code for code, (name, _, _) in CODES.items()}


@functools.cache
def torch_dtypes() -> dict[str, "torch.dtype"]:
    """safetensors code -> torch dtype, for the dtypes this torch build has (imports torch on first use)."""
    import torch

    return {code: getattr(torch, name) for code, (name, _, _) in CODES.items() if hasattr(torch, name)}


_DTYPE_NAMES: dict = {}
_DTYPES: dict = {}  # torch_dtypes(), filled on the first TensorSlice.dtype (every load asks ~1000 times)


def dtype_name(dtype: "torch.dtype") -> str:
    """``torch.float32`` -> ``"float32"`` (the names CODES uses); memoized, it runs once per tensor per save."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


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
        dtype = (_DTYPES or _DTYPES.update(torch_dtypes()) or _DTYPES).get(self.code)  # a dict lookup once warm
        if dtype is None:
            import torch

            raise CheckpointError(f"{self.path}: a tensor has dtype {self.code} ({self.dtype_name}), which torch "
                                  f"{torch.__version__} does not have; upgrade torch to read it")
        return dtype

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
        if is_url(self.path):  # an object: ranged GETs, a part at a time
            for a in range(0, self.nbytes, READ_RUN):
                f.write(self.path.read_range(self.offset + a, min(READ_RUN, self.nbytes - a)))
            return
        with open(self.path, "rb", buffering=0) as src:
            copy_range(src.fileno(), f, self.offset, self.nbytes, self.path)


def byte_view(t: "torch.Tensor") -> memoryview:
    """A flat byte view of a CPU contiguous tensor's memory, no copy (the caller keeps ``t`` alive)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray(0))
    arr = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    arr.owner = t  # the view keeps the tensor alive: a HashingFile may hash it after the write returns
    return memoryview(arr)


def read_slices(path: Path, items: "list[tuple[TensorSlice, torch.Tensor]]") -> None:
    """Read many slices of one file straight into their destination tensors (CPU, contiguous, right dtype).

    One open; slices in file order, cut into runs of adjacent bytes (at most ``READ_CHUNK`` bytes and
    ``_IOV_MAX`` buffers each), each run filled by one ``os.preadv`` into the destinations' memory: about one
    page-cache copy, like a raw read of the file. A read of more than ``PARALLEL_MIN`` bytes of a file that is
    in the page cache is read by ``READ_THREADS`` threads, this one and helpers, each taking every
    ``READ_THREADS``-th run (``preadv`` releases the GIL): the kernel's copies proceed in parallel. A file that is not in the
    cache is read in order by one thread: the kernel's readahead then streams it from the disk, where reads
    from several threads at several offsets defeat it (measured: ~1.6x slower, docs/performance.md).
    """
    items = sorted((it for it in items if it[0].nbytes), key=lambda it: it[0].offset)
    if not items:
        return
    total = sum(it[0].nbytes for it in items)
    if is_url(path):  # an object: ranged GETs of the same runs, copied into the destinations
        path.read_into([(start, _views(pieces)[0]) for start, pieces in _runs(items, READ_RUN)])
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        end = items[-1][0].offset + items[-1][0].nbytes
        if total < PARALLEL_MIN or READ_THREADS < 2 or not _in_page_cache(fd, items[0][0].offset, end):
            for start, pieces in _runs(items, _MAX_RUN):
                _read_run(fd, start, pieces, path)
            return
        runs = list(_runs(items, READ_CHUNK))
        lanes = [runs[i::READ_THREADS] for i in range(READ_THREADS)]  # lane 0: this thread's own
        futures = [_reader_pool().submit(_read_lane, fd, lane, path) for lane in lanes[1:] if lane]
        error: BaseException | None = None
        try:
            _read_lane(fd, lanes[0], path)
        except BaseException as e:  # noqa: BLE001 -- raised below, once the other lanes have stopped
            error = e
        errors = [f.exception() for f in futures]  # every lane ends before the descriptor closes
        first = error or next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
    finally:
        os.close(fd)


READ_CHUNK = 16 << 20  # bytes per preadv of a parallel read
PARALLEL_MIN = 64 << 20  # below this a thread pool costs more than it saves
READ_THREADS = max(1, min(4, os.cpu_count() or 1))  # this thread and READ_THREADS - 1 helpers
_POOL: list[ThreadPoolExecutor] = []


def _reader_pool() -> ThreadPoolExecutor:
    """The process's helper reader threads, started on the first parallel read and kept (idle threads cost
    nothing; starting them at every load cost more than the overhead the target allows)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max(1, READ_THREADS - 1), thread_name_prefix="anytopo-read"))
    return _POOL[0]


def _read_lane(fd: int, runs: list, path: Path) -> None:
    for start, pieces in runs:
        _read_run(fd, start, pieces, path)


def _in_page_cache(fd: int, start: int, end: int) -> bool:
    """Whether the byte range ``start:end`` of ``fd`` looks cached: a page at its start, middle and end each
    read without waiting for the disk (``RWF_NOWAIT``; a cold page answers EAGAIN). False where the flag is
    unavailable."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None or end <= start:
        return False
    probe = bytearray(4096)
    for offset in (start, (start + end) // 2, max(start, end - len(probe))):
        try:
            if os.preadv(fd, [probe], offset, flag) <= 0:
                return False
        except OSError:  # BlockingIOError (not cached), or a filesystem that refuses the flag
            return False
    return True


def _runs(items: "list[tuple[TensorSlice, torch.Tensor]]", chunk: int) -> "Iterator[tuple[int, list[tuple]]]":
    """(file offset, pieces) of each run of adjacent bytes: at most ``chunk`` bytes and ``_IOV_MAX`` pieces, a
    piece being (destination tensor, byte offset in it, length): a destination larger than ``chunk`` is cut
    into several. The buffers themselves are made where the run is read (``_read_run``, possibly a reader
    thread), so building them overlaps the other runs' copies."""
    start = end = -1
    pieces: list[tuple] = []
    size = 0
    for s, t in items:
        n, offset = s.nbytes, s.offset
        for a in range(0, n, chunk):
            length = min(chunk, n - a)
            if pieces and (offset + a != end or len(pieces) >= _IOV_MAX or size + length > chunk):
                yield start, pieces
                pieces, size = [], 0
            if not pieces:
                start = end = offset + a
            pieces.append((t, a, length))
            end += length
            size += length
    if pieces:
        yield start, pieces


def _read_run(fd: int, start: int, pieces: list[tuple], path: Path) -> None:
    """Fill ``pieces`` (destination tensor, byte offset in it, length) from ``fd`` at ``start``: one
    ``preadv``, then buffer by buffer if it came back short (rare: signals, runs over ~2 GiB)."""
    views, want = _views(pieces)
    done = os.preadv(fd, views, start)
    if done >= want:
        return
    offset = start
    for v in views:
        pos = min(max(done - (offset - start), 0), len(v))
        while pos < len(v):
            n = os.preadv(fd, [v[pos:]], offset + pos)
            if n == 0:
                raise CheckpointError(f"{path}: file ended early (truncated?); re-copy it or use an earlier checkpoint")
            pos += n
        offset += len(v)


def _views(pieces: list[tuple]) -> tuple[list[memoryview], int]:
    """The byte views of ``pieces`` (destination tensor, byte offset in it, length), and their total length."""
    views, want = [], 0
    for t, a, n in pieces:
        v = byte_view(t)
        views.append(v if a == 0 and n == len(v) else v[a:a + n])
        want += n
    return views, want


def _safetensors_verdict(path: Path) -> str | None:
    """What the installed safetensors says about the file's header: None if it accepts it, else its reason.

    ``safe_open`` parses and validates the header (it maps the file but reads no tensor); framework
    "numpy" is the one that needs no torch.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy"):
            return None
    except SafetensorError as e:
        return " ".join(str(e).split()).removeprefix("Error while deserializing header: ")


def _looks_truncated(path: Path, size: int) -> bool:
    """Best effort, for the message only: does the header promise more bytes than the file has?"""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                return True
            if n > 100_000_000:  # over safetensors' header limit: refused for that, not truncated
                return False
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + n + max(ends, default=0) > size
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return False


def _truncated(path: Path, size: int) -> CheckpointError:
    return CheckpointError(f"{path}: truncated: the safetensors header describes more bytes than the file's {size}; "
                           "the save or copy was interrupted, re-copy it or use an earlier checkpoint")


def _invalid(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid safetensors file (safetensors: {problem}); the file is damaged, "
                           "re-copy it or use an earlier checkpoint")


def _remote_header(path) -> tuple[int, dict]:
    """The header of a safetensors object, by two ranged GETs, validated by the installed ``safetensors`` on a
    sparse local stand-in of the object's size (its header, then a hole: safe_open maps it and reads no
    tensor), so the same rules apply to objects as to files without downloading the data."""
    import tempfile

    size = path.stat().st_size
    if size < 8:
        raise _invalid(path, f"{size} bytes, fewer than the 8-byte header length")
    (n,) = struct.unpack("<Q", bytes(path.read_range(0, 8)))
    if n > 100_000_000:
        raise _invalid(path, f"header of {n} bytes is over the 100 MB limit")
    if 8 + n > size:
        raise _truncated(path, size)
    raw = bytes(path.read_range(8, n))
    with tempfile.NamedTemporaryFile(prefix="anytopo-header-", suffix=".safetensors") as stand_in:
        stand_in.write(struct.pack("<Q", n) + raw)
        stand_in.truncate(size)
        stand_in.flush()
        problem = _safetensors_verdict(Path(stand_in.name))
    if problem is not None:
        try:
            ends = [v["data_offsets"][1] for k, v in json.loads(raw).items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            ends = []
        raise _truncated(path, size) if 8 + n + max(ends, default=0) > size else _invalid(path, problem)
    return n, json.loads(raw)


def read_header(path: Path) -> tuple[dict[str, TensorSlice], dict[str, str]]:
    """Parse a safetensors header as the installed ``safetensors`` defines it. Returns (tensors by name,
    __metadata__).

    The rules are the library's, applied by the library: its parser reads the header first, and a file it
    refuses is refused here in one line naming the file (header size limit, a JSON object, known dtypes,
    offsets that tile the data section from its first to the file's last byte with no gap or overlap,
    shape x dtype size == byte count, metadata str -> str). safetensors does not expose the offsets, so
    they are read from the same, now validated, header.
    """
    if is_url(path):
        n, header = _remote_header(path)
    else:
        size = path.stat().st_size
        problem = _safetensors_verdict(path)
        if problem is not None:
            if _looks_truncated(path, size):
                raise _truncated(path, size)
            raise _invalid(path, problem)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors: dict[str, TensorSlice] = {}
    for name, info in header.items():
        code, shape = info["dtype"], tuple(info["shape"])
        begin, end = info["data_offsets"]
        known = CODES.get(code)
        if known is None:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {code}, which safetensors knows but torch has "
                                  "no dtype for; anytopo cannot use it")
        pack = known[2]
        if pack != 1:
            if not shape or shape[-1] % pack:
                raise CheckpointError(f"{path}: tensor {name!r} is {code} of shape {list(shape)}; torch's {known[0]} "
                                      f"needs a last dimension divisible by {pack}, so it cannot be read as torch")
            shape = (*shape[:-1], shape[-1] // pack)
        tensors[name] = TensorSlice(path, base + begin, end - begin, code, shape)
    return tensors, metadata


def plan_header(items: Iterable[tuple[str, str, tuple[int, ...]]],
                metadata: dict[str, str] | None) -> tuple[bytes, list[int]]:
    """Build the header bytes for (name, torch dtype name, torch shape) written in the given order, the way
    ``safetensors.torch.save_file`` describes the same tensors; returns (header, byte sizes)."""
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
        _, itemsize, pack = CODES[code]
        nbytes = math.prod(shape) * itemsize
        # plain lists: json encodes them about twice as fast as torch.Size (a tuple subclass)
        if pack == 1:
            shape = list(shape)
        elif shape:
            shape = [*shape[:-1], shape[-1] * pack]
        else:
            raise CheckpointError(f"tensor {name!r} is a 0-d {dtype}, which safetensors cannot store (it packs "
                                  f"{pack} values per element along the last dimension); reshape it to (1,) or "
                                  "save as .pth")
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
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
        f.write(byte_view(t if t.is_contiguous() else t.contiguous()))


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


sync_file_range = libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait for it
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
            self.fd = f.fileno() if sync_file_range is not None and durable() else -1
        except (AttributeError, OSError, ValueError):  # BytesIO and friends
            self.fd = -1

    def advance(self, n: int) -> None:
        self.pos += n
        if self.fd >= 0 and self.pos - self.start >= WRITEBACK_CHUNK:
            self.f.flush()
            if sync_file_range(self.fd, self.start, self.pos - self.start, SYNC_FILE_RANGE_WRITE) != 0:
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
