"""Give back the pages of a memory-mapped checkpoint once a tensor has been written out (Linux).

``torch.load(path, mmap=True)`` maps the whole file privately; every tensor that is read (to be written
elsewhere) faults its pages into this process, so converting a multi-GB ``.pth`` would end with the whole
file resident. After a tensor has been written, ``madvise(MADV_DONTNEED)`` unmaps the pages that lie wholly
inside its bytes; the data stays in the page cache and is read back from the file if touched again.

That is only right for pages that still hold the file's bytes. A private mapping's page that was written to
is a private copy -- ``torch.load`` writes every page of a file saved with the other byte order, swapping it
in place -- and dropping it would bring the file's unswapped bytes back to a later reader (a tied entry is
a second tensor over the same storage). So each range is first checked in ``/proc/self/pagemap``: if any
page in it is a private copy (present or swapped, and not a file page), nothing is dropped. Only whole
pages inside the tensor are considered, and only inside a private mapping of the file ``torch.load`` mapped
(found in ``/proc/self/maps``); anonymous memory and platforms without these files are left alone.
(``MADV_PAGEOUT`` would be safe without the check, but the kernel ignores it for files the process may not
write, e.g. someone else's read-only checkpoint, so that convert would not stream.)
"""
from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_MADV_DONTNEED = 4
_PM_PRESENT, _PM_SWAPPED, _PM_FILE = 1 << 63, 1 << 62, 1 << 61  # /proc/<pid>/pagemap entry bits
_PAGE = mmap.PAGESIZE


def libc_function(name: str, argtypes: list) -> Any:
    """A libc call through ctypes (int result), or None where this platform has no such call."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError, TypeError):  # TypeError: Windows' ctypes cannot open "no name"
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_madvise = libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])


def file_mappings(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """Address ranges [start, end) of this process's private mappings of ``path`` ([] where unknown)."""
    if _madvise is None:
        return []
    target = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == target and parts[1][3] == "p":
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


class PageReleaser:
    """Drops the pages of tensors that live inside given file mappings from this process (see module doc)."""

    __slots__ = ("ranges",)

    def __init__(self, ranges: list[tuple[int, int]]):
        self.ranges = ranges

    @classmethod
    def for_file(cls, path: str | os.PathLike[str] | Path) -> "PageReleaser | None":
        ranges = file_mappings(path)
        return cls(ranges) if ranges else None

    def release(self, t: torch.Tensor) -> bool:
        """Unmap the whole pages inside ``t``'s bytes, if they lie in one of the mappings and all still hold
        the file's bytes; True if done.

        Only ``t``'s own bytes (not the rest of its storage, which other entries may view) are considered;
        a non-contiguous ``t`` was copied to be written, so it is left alone.
        """
        if not t.is_contiguous():
            return False
        ptr, n = t.data_ptr(), t.numel() * t.element_size()
        start = -(-ptr // _PAGE) * _PAGE  # first page boundary at or after its bytes start
        end = (ptr + n) // _PAGE * _PAGE  # last page boundary at or before it ends
        if end <= start:
            return False  # smaller than a page (or straddling one boundary): nothing of its own to drop
        for lo, hi in self.ranges:
            if lo <= ptr and ptr + n <= hi:
                if not _all_file_pages(start, end):
                    return False
                return _madvise(start, end - start, _MADV_DONTNEED) == 0
        return False


def _all_file_pages(start: int, end: int) -> bool:
    """True if no page in [start, end) is a private copy (present or swapped out without being a file page).

    Reads this process's own ``/proc/self/pagemap`` (8 bytes per page; the flag bits need no privilege).
    Unreadable -> False, so nothing is dropped.
    """
    first, count = start // _PAGE, (end - start) // _PAGE
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return False
    try:
        raw = os.pread(fd, 8 * count, 8 * first)
    except OSError:
        return False
    finally:
        os.close(fd)
    if len(raw) != 8 * count:
        return False
    used = _PM_PRESENT | _PM_SWAPPED
    return not any(e & used and not e & _PM_FILE for e in memoryview(raw).cast("Q"))
