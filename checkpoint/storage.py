"""Where checkpoint bytes live: the local (or shared) filesystem, written so that a crash never leaves
something that looks complete.

- ``atomic_file(path)``: a temp file beside ``path``, flushed, fsynced and renamed over it (optionally hashed
  while written: ``HashingFile``);
- ``atomic_dir(path)``: a directory built under a temp name and renamed into place; at every instant either
  the old or the new complete directory exists. Every checkpoint entry is committed through it;
- ``fsync_dir``, ``sha256_file``, ``read_json``: the rest of what the writers and readers need from a disk.

The bottom of the package: it imports nothing of anytopo but ``errors``, and never torch.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .errors import CheckpointError


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
    are hashed; the caller must keep every buffer alive until ``hexdigest`` (``byte_view`` ties each
    view to its tensor). Inside :func:`inline_hashing` it hashes on the writing thread instead.
    """

    def __init__(self, f: BinaryIO):
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


_DURABILITY = threading.local()


@contextmanager
def volatile() -> Iterator[None]:
    """Within this block, on this thread, files and directories are written without fsync (and without early
    writeback): for a staging copy whose durability comes from elsewhere (an entry uploaded to an object store
    and committed there), where making it durable on the local disk only adds the disk's time."""
    before = getattr(_DURABILITY, "volatile", False)
    _DURABILITY.volatile = True
    try:
        yield
    finally:
        _DURABILITY.volatile = before


def durable() -> bool:
    """Whether writes on this thread are made durable (False inside ``volatile()``)."""
    return not getattr(_DURABILITY, "volatile", False)


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
            if durable():
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
    """Build a directory under a temp name beside ``path``, then put it in place of ``path`` (``commit_dir``):
    at every instant ``path`` is either the old or the new complete directory. On an error the temp is
    removed and ``path`` is untouched. The directory gets the mode a plain ``mkdir`` would (0777 less the
    umask), not mkdtemp's 0700.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def libc_function(name: str, argtypes: list) -> Any:
    """A libc call through ctypes (int result), or None where this platform has no such call."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError, TypeError):  # TypeError: Windows' ctypes cannot open "no name"
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_renameat2 = libc_function("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint])
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}
OLD_SUFFIX = ".old-"
"""``.NAME.old-PID``: where ``commit_dir`` parks the previous directory when it cannot swap the two atomically."""


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform or filesystem cannot (then nothing changed)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(b))


def commit_dir(tmp: Path, path: Path) -> None:
    """Put the complete directory ``tmp`` in place of ``path``, durably. Every checkpoint directory (a saved
    directory, a training entry, a sharded entry) is committed here, so at every instant ``path`` is either
    the old or the new complete directory: where ``path`` exists the two are swapped atomically (``exchange``)
    and the old one removed after; where the filesystem cannot swap, the old one is renamed to
    ``.NAME.old-PID`` first, and if the process dies before the new one is renamed in, ``recover_dirs`` (run
    by the checkpoint manager before it reads or writes entries) renames it back."""
    fsync_dir(tmp)
    if path.exists() and exchange(tmp, path):
        fsync_dir(path.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        return
    old = None
    if path.exists():
        old = path.parent / f".{path.name}{OLD_SUFFIX}{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_dirs(directory: Path) -> list[Path]:
    """Finish what a ``commit_dir`` that died between its two renames left (filesystems without an atomic swap):
    a parked ``.NAME.old-PID`` whose ``NAME`` is missing is renamed back (the new directory never arrived); one
    whose ``NAME`` exists is removed (the new one is in place). Returns the directories restored."""
    restored = []
    if not directory.is_dir():
        return restored
    for old in directory.glob(f".*{OLD_SUFFIX}*"):
        name = old.name[1:old.name.rindex(OLD_SUFFIX)]
        target = directory / name
        if not old.is_dir() or not name:
            continue
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            continue
        try:
            os.replace(old, target)
            restored.append(target)
        except OSError:
            continue
    if restored:
        fsync_dir(directory)
    return restored


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported, and inside ``volatile()``)."""
    if not durable():
        return
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


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    if not isinstance(path, (str, os.PathLike)) and hasattr(path, "sha256"):  # an objstore.S3Path: streamed GET
        return path.sha256()
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def child(directory: Path, name: Any, *, listed_in: str = "its manifest") -> Path:
    """``directory / name`` for a file name a checkpoint's own index or manifest gave: only a relative path that
    stays inside ``directory`` (no absolute path, no ``..``, no backslash). Anything else is refused in one line,
    so a crafted index cannot make a load read ``/etc/passwd`` or a file beside the checkpoint."""
    ok = isinstance(name, str) and name and not name.startswith("/") and "\\" not in name and "\x00" not in name \
        and ".." not in name.split("/") and not os.path.isabs(name)
    if not ok:
        raise CheckpointError(f"{directory}: {listed_in} names {name!r}, which is not a file inside the checkpoint's "
                              "folder; refused (a checkpoint may name only files under its own folder or prefix)")
    return directory / name


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e}); the file is damaged or not part of a checkpoint") from None
