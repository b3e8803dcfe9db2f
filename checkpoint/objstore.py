"""Checkpoints on an S3-compatible object store: ``s3://bucket/prefix`` paths, read by byte ranges, written by
upload and committed by one conditional put.

The other backend of ``storage`` (the local or shared filesystem). An object store has no directories, no
rename and no fsync, so an entry is committed differently:

- the entry's files are uploaded under ``s3://bucket/prefix/step-N/`` (multipart for large ones, parts in
  parallel; invisible until complete), then its ``manifest.json`` -- which lists every file with its size and
  sha256 -- is put LAST with ``If-None-Match: *``. The manifest is the commit: an entry exists only once it does,
  and it names only objects that were complete before it was written. A second writer of the same entry gets
  412 and stops with one line;
- ``latest`` is the newest committed entry (no pointer object that could move ahead of the data); pruning
  deletes an entry's manifest first, then its objects; objects left by a save that never committed are
  invisible, and removed by the next save of that step or by pruning;
- reads go straight into the destination: a safetensors header by one ranged GET, tensors by ranged GETs
  copied into the target tensors, a bounded batch at a time (no download to disk).

:class:`S3Path` answers the read side of ``pathlib.Path`` (``/``, ``name``, ``parent``, ``is_file``,
``is_dir``, ``iterdir``, ``glob``, ``stat``, ``read_bytes``, ``open("rb")``), so the readers take either.
It has no ``__fspath__``: code that would hand it to ``open()`` or ``os`` fails loudly instead of reading a
local file of that name.

The client is obstore (Rust's ``object_store``; chosen by measurement, see docs/performance.md). Credentials
and endpoint come from the standard variables only: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``
(``AWS_SESSION_TOKEN``), ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` (``AWS_ENDPOINT_URL_S3``)
for a store that is not AWS, where ``http://`` is allowed because the URL says so. Transient errors (5xx,
dropped connections, timeouts) are retried with exponential backoff for at most ``ANYTOPO_S3_RETRY_S``
seconds (30 by default); then, and for bad credentials, a missing bucket or an unreachable endpoint, one line
naming the URL and the fix (``CheckpointError``).
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import posixpath
import shutil
import tempfile
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import CheckpointError, first_line

SCHEME = "s3://"
RETRY_VAR = "ANYTOPO_S3_RETRY_S"
DEFAULT_RETRY_S = 30.0
PART_BYTES = 8 << 20  # multipart part size (S3's minimum is 5 MiB; 8 MiB beat 16 here, bench/s3_io.py)
READ_RUN = 16 << 20  # bytes per ranged GET of tensors
READ_BATCH = 256 << 20  # bytes fetched before being copied out: the bound on a read's extra memory
UPLOAD_CONCURRENCY = 8


def is_url(path: Any) -> bool:
    return isinstance(path, S3Path) or (isinstance(path, str) and path.startswith(SCHEME))


def as_path(path: str | os.PathLike | S3Path) -> Path | S3Path:
    """``s3://...`` (a string or an ``S3Path``) as an :class:`S3Path`, anything else as a ``pathlib.Path``."""
    if isinstance(path, S3Path):
        return path
    if isinstance(path, str) and path.startswith(SCHEME):
        return S3Path.from_url(path)
    return Path(path)


# --------------------------------------------------------------------------------------------- the client

_stores: dict[tuple, Any] = {}
_stores_lock = threading.Lock()


def retry_seconds() -> float:
    raw = os.environ.get(RETRY_VAR, "")
    try:
        value = float(raw) if raw else DEFAULT_RETRY_S
    except ValueError:
        raise CheckpointError(f"{RETRY_VAR}={raw!r} is not a number of seconds: unset it or give e.g. 30") from None
    return max(0.0, value)


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _store(bucket: str, *, retry_s: float | None = None) -> Any:
    """The obstore S3Store of ``bucket``, configured from the environment (one per bucket and setting)."""
    try:
        from obstore.store import S3Store
    except ImportError:
        raise CheckpointError("s3:// checkpoints need obstore: pip install -e . in this project's venv "
                              "(it is a dependency of anytopo)") from None
    key_id, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key_id or not secret:
        raise CheckpointError(f"{SCHEME}{bucket}: no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                              "(and AWS_ENDPOINT_URL for a store that is not AWS)")
    ep = endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    retry_s = retry_seconds() if retry_s is None else retry_s
    token = os.environ.get("AWS_SESSION_TOKEN")
    cache_key = (bucket, ep, region, key_id, secret, token, retry_s)
    with _stores_lock:
        store = _stores.get(cache_key)
        if store is None:
            options: dict[str, Any] = {"connect_timeout": "5s", "timeout": "300s"}
            if ep and ep.startswith("http://"):
                options["allow_http"] = True
            config: dict[str, Any] = {"access_key_id": key_id, "secret_access_key": secret, "region": region}
            if token:
                config["session_token"] = token
            if ep:
                config["endpoint"] = ep
                config["virtual_hosted_style_request"] = False
            store = S3Store(bucket, client_options=options,
                            retry_config={"max_retries": 1000 if retry_s > 0 else 0,
                                          "retry_timeout": timedelta(seconds=retry_s),
                                          "backoff": {"init_backoff": timedelta(milliseconds=100),
                                                      "max_backoff": timedelta(seconds=5), "base": 2}},
                            **config)
            _stores[cache_key] = store
    return store


def explain(e: BaseException, url: str, action: str) -> CheckpointError:
    """One line for a failed store operation: what, on which URL, why, the fix."""
    from obstore import exceptions as oe

    text = str(e)
    where = endpoint() or "AWS S3"
    if isinstance(e, (oe.PermissionDeniedError, oe.UnauthenticatedError)) or "SignatureDoesNotMatch" in text \
            or "InvalidAccessKeyId" in text:
        return CheckpointError(f"cannot {action} {url}: {where} refused the credentials (403); check "
                               "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_REGION)")
    if "NoSuchBucket" in text:
        bucket = url[len(SCHEME):].split("/", 1)[0]
        return CheckpointError(f"cannot {action} {url}: bucket {bucket!r} does not exist at {where}; create it or "
                               "fix the URL")
    if isinstance(e, (oe.NotFoundError, FileNotFoundError)):
        return CheckpointError(f"{url}: no such object; point at a checkpoint entry or a checkpoint-dir URL")
    if "error sending request" in text or "Connect" in text or "timed out" in text.lower():
        return CheckpointError(f"cannot {action} {url}: {where} did not answer (gave up after {retry_seconds():g} s of "
                               f"retries, {RETRY_VAR}); check AWS_ENDPOINT_URL and that the store is up")
    line = first_line(e)
    return CheckpointError(f"cannot {action} {url}: {line[:300]}")


class ObjectNotFound(CheckpointError, FileNotFoundError):
    """A missing object: a ``CheckpointError`` with its one line, and a ``FileNotFoundError`` for code written
    against ``pathlib`` (which catches ``OSError``)."""


def _call(action: str, url: str, fn, *args, **kwargs):
    from obstore import exceptions as oe

    try:
        return fn(*args, **kwargs)
    except CheckpointError:
        raise
    except (oe.BaseError, OSError) as e:
        if _not_found(e):
            raise ObjectNotFound(f"{url}: no such object; point at a checkpoint entry or a checkpoint-dir URL") \
                from None
        raise explain(e, url, action) from None


def _not_found(e: BaseException) -> bool:
    from obstore import exceptions as oe

    return isinstance(e, (oe.NotFoundError, FileNotFoundError)) and "NoSuchBucket" not in str(e)


def check_access(url: str | S3Path, *, timeout_s: float = 5.0) -> None:
    """Fail within seconds, with the fix, when ``url``'s bucket cannot be listed (credentials, bucket,
    endpoint): before a run trains for an hour and then cannot save."""
    p = as_path(url)
    import obstore

    store = _store(p.bucket, retry_s=timeout_s)
    _call("list", str(p), lambda: obstore.list_with_delimiter(store, prefix=p._dir_prefix() or None))


# ----------------------------------------------------------------------------------------------- paths

class S3Path:
    """``s3://bucket/key``: the read side of ``pathlib.Path`` for an object store (see the module doc)."""

    __slots__ = ("bucket", "key")

    def __init__(self, bucket: str, key: str = ""):
        if not bucket or "/" in bucket:
            raise CheckpointError(f"{SCHEME}{bucket}/{key}: not a bucket name; use s3://BUCKET/PREFIX")
        parts = [p for p in key.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise CheckpointError(f"{SCHEME}{bucket}/{key}: '..' in an object key; name objects under the prefix")
        self.bucket = bucket
        self.key = "/".join(parts)

    @classmethod
    def from_url(cls, url: str) -> "S3Path":
        rest = url[len(SCHEME):]
        bucket, _, key = rest.partition("/")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Path({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Path) and (self.bucket, self.key) == (other.bucket, other.key)

    def __hash__(self) -> int:
        return hash((S3Path, self.bucket, self.key))

    def __lt__(self, other: "S3Path") -> bool:
        return str(self) < str(other)

    def __truediv__(self, name: str | os.PathLike) -> "S3Path":
        name = os.fspath(name)
        if name.startswith("/"):
            raise CheckpointError(f"{self}: absolute name {name!r} under an object prefix")
        return S3Path(self.bucket, f"{self.key}/{name}" if self.key else name)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1] if self.key else ""

    @property
    def parent(self) -> "S3Path":
        return S3Path(self.bucket, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def url(self) -> str:
        return str(self)

    def with_name(self, name: str) -> "S3Path":
        return self.parent / name

    def resolve(self) -> "S3Path":
        return self

    def absolute(self) -> "S3Path":
        return self

    def _dir_prefix(self) -> str:
        return f"{self.key}/" if self.key else ""

    def _store(self) -> Any:
        return _store(self.bucket)

    # -- what is there

    def head(self) -> dict[str, Any] | None:
        import obstore

        try:
            return obstore.head(self._store(), self.key)
        except Exception as e:  # noqa: BLE001 -- sorted below: a missing object is an answer, the rest is not
            if _not_found(e):
                return None
            raise explain(e, str(self), "read") from None

    def is_file(self) -> bool:
        return bool(self.key) and self.head() is not None

    def is_dir(self) -> bool:
        import obstore

        listing = _call("list", str(self), obstore.list_with_delimiter, self._store(), prefix=self._dir_prefix() or None)
        return bool(listing["objects"] or listing["common_prefixes"])

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def stat(self) -> types.SimpleNamespace:
        meta = self.head()
        if meta is None:
            raise ObjectNotFound(f"{self}: no such object; point at a checkpoint entry or a checkpoint-dir URL")
        mtime = meta["last_modified"].timestamp()
        return types.SimpleNamespace(st_size=int(meta["size"]), st_mtime=mtime, st_mtime_ns=int(mtime * 1e9),
                                     e_tag=meta.get("e_tag"))

    def iterdir(self) -> Iterator["S3Path"]:
        """Objects and "subdirectories" (common prefixes) right under this prefix."""
        import obstore

        listing = _call("list", str(self), obstore.list_with_delimiter, self._store(), prefix=self._dir_prefix() or None)
        names = {posixpath.basename(p.rstrip("/")) for p in listing["common_prefixes"]}
        names |= {posixpath.basename(m["path"]) for m in listing["objects"]}
        for name in sorted(n for n in names if n):
            yield self / name

    def glob(self, pattern: str) -> Iterator["S3Path"]:
        if "/" in pattern:
            raise CheckpointError(f"{self}: only one-level glob patterns, not {pattern!r}")
        for p in self.iterdir():
            if fnmatch.fnmatchcase(p.name, pattern):
                yield p

    def walk_objects(self) -> list[dict[str, Any]]:
        """Every object under this prefix (any depth): ``{"path", "size", ...}``."""
        import obstore

        return _call("list", str(self), lambda: obstore.list(self._store(), prefix=self._dir_prefix() or None)
                     .collect())

    # -- reading

    def read_bytes(self) -> bytes:
        import obstore

        return bytes(_call("read", str(self), lambda: obstore.get(self._store(), self.key).bytes()))

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def read_range(self, start: int, length: int) -> memoryview:
        import obstore

        if length <= 0:
            return memoryview(b"")
        return memoryview(_call("read", str(self), obstore.get_range, self._store(), self.key, start=start,
                                length=length))

    def open(self, mode: str = "rb", buffering: int = 8 << 20) -> io.BufferedReader:
        if mode != "rb":
            raise CheckpointError(f"{self}: objects open for reading only ('rb'), not {mode!r}")
        return io.BufferedReader(_RangeFile(self), buffer_size=max(buffering, io.DEFAULT_BUFFER_SIZE))

    def read_into(self, runs: list[tuple[int, list[memoryview]]]) -> None:
        """Fill each run's buffers (consecutive bytes from its start offset) by ranged GETs, a bounded batch at a
        time, the GETs of a batch in parallel."""
        import obstore

        batch: list[tuple[int, list[memoryview], int]] = []
        size = 0

        def flush() -> None:
            if not batch:
                return
            bufs = _call("read", str(self), obstore.get_ranges, self._store(), self.key,
                         starts=[b[0] for b in batch], lengths=[b[2] for b in batch], coalesce=0)
            for (_, views, n), buf in zip(batch, bufs):
                src = memoryview(buf)
                if len(src) != n:
                    raise CheckpointError(f"{self}: {len(src)} bytes where {n} were expected; the object is shorter "
                                          "than its header says (damaged or replaced)")
                pos = 0
                for v in views:
                    v.cast("B")[:] = src[pos:pos + len(v)]  # ctypes views say "<B"; the bytes are the same
                    pos += len(v)
            batch.clear()

        for start, views in runs:
            n = sum(len(v) for v in views)
            if n == 0:
                continue
            batch.append((start, views, n))
            size += n
            if size >= READ_BATCH:
                flush()
                size = 0
        flush()

    def sha256(self) -> str:
        import obstore

        def digest() -> str:
            h = hashlib.sha256()
            for chunk in obstore.get(self._store(), self.key).stream(min_chunk_size=PART_BYTES):
                h.update(chunk)
            return h.hexdigest()

        return _call("read", str(self), digest)

    # -- writing (what the writers use; not a pathlib method)

    def put_bytes(self, data: bytes, *, create_only: bool = False) -> None:
        """Put ``data`` as this object; ``create_only``: If-None-Match (a second writer gets a one-line error)."""
        import obstore
        from obstore import exceptions as oe

        try:
            obstore.put(self._store(), self.key, data, mode="create" if create_only else "overwrite",
                        use_multipart=False)
        except oe.AlreadyExistsError:
            raise CheckpointError(f"{self} was committed by another writer meanwhile: two runs write to one "
                                  "checkpoint dir; give each its own --checkpoint-dir") from None
        except Exception as e:  # noqa: BLE001
            raise explain(e, str(self), "write") from None

    def upload(self, local: Path) -> None:
        """Upload local file ``local`` as this object: multipart (parts in parallel) when large; atomic."""
        import mmap

        import obstore

        with open(local, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < PART_BYTES:
                data: Any = f.read()
                mapped = None
            else:  # mapped, not read: the parts go out from the page cache (obstore reading the path: ~1.4x slower)
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                data = memoryview(mapped)
            try:
                _call("write", str(self), obstore.put, self._store(), self.key, data, chunk_size=PART_BYTES,
                      max_concurrency=UPLOAD_CONCURRENCY)
            finally:
                if mapped is not None:
                    data.release()
                    mapped.close()

    def unlink(self, missing_ok: bool = True) -> None:
        delete([self])


class _RangeFile(io.RawIOBase):
    """A seekable read-only raw file over one object (for torch.load, json and the like: wrap it in
    io.BufferedReader, as ``S3Path.open`` does)."""

    def __init__(self, path: S3Path):
        self.path = path
        self._size = path.stat().st_size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        memoryview(b).cast("B")[:n] = self.path.read_range(self._pos, n)
        self._pos += n
        return n


def delete(paths: Iterable[S3Path]) -> None:
    """Delete objects (a missing one is fine), batched per bucket."""
    import obstore

    by_bucket: dict[str, list[str]] = {}
    for p in paths:
        by_bucket.setdefault(p.bucket, []).append(p.key)
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):
            _call("delete", f"{SCHEME}{bucket}/{keys[i]}", obstore.delete, _store(bucket), keys[i:i + 1000])


def delete_tree(prefix: S3Path, *, first: str | None = None) -> None:
    """Delete every object under ``prefix``; ``first`` (a name under it, e.g. the manifest) goes before the rest,
    so that a reader never sees it without the objects it names."""
    if first is not None:
        delete([prefix / first])
    delete([S3Path(prefix.bucket, m["path"]) for m in prefix.walk_objects()])


def upload_files(files: list[tuple[Path, S3Path]]) -> None:
    """Upload local files, several at a time (each large one also in parallel parts)."""
    if not files:
        return
    if len(files) == 1:
        files[0][1].upload(files[0][0])
        return
    with ThreadPoolExecutor(min(4, len(files)), thread_name_prefix="anytopo-upload") as pool:
        for f in [pool.submit(dst.upload, src) for src, dst in files]:
            f.result()


def clear_prefix(dst: S3Path, *, commit_name: str) -> None:
    """Make room for a new entry at ``dst``: an entry committed there stops existing (its commit object goes
    first: re-saving a step replaces it, and meanwhile the previous committed entry is the latest), and the
    objects of a save there that never committed go too."""
    if (dst / commit_name).is_file():
        delete_tree(dst, first=commit_name)
    else:
        stale = dst.walk_objects()
        if stale:
            delete(S3Path(dst.bucket, m["path"]) for m in stale)


def publish_directory(local: Path, dst: S3Path, *, commit_name: str) -> None:
    """Commit local entry directory ``local`` as ``dst``: ``clear_prefix``, every file but ``commit_name``
    uploaded, then ``commit_name`` put last, create-only (the commit)."""
    clear_prefix(dst, commit_name=commit_name)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    upload_files([(p, dst / p.relative_to(local).as_posix()) for p in files if p.name != commit_name])
    (dst / commit_name).put_bytes((local / commit_name).read_bytes(), create_only=True)


STAGING_VAR = "ANYTOPO_STAGING_DIR"


@contextmanager
def staging(name: str) -> Iterator[Path]:
    """A private local directory path ``<staging>/anytopo-stage-XXXX/name`` (not created) where an entry is
    written before its upload; removed afterwards whatever happens. ``ANYTOPO_STAGING_DIR`` picks the disk
    (default: the system's temp directory); it must hold one entry."""
    root = os.environ.get(STAGING_VAR) or None
    try:
        tmp = Path(tempfile.mkdtemp(prefix="anytopo-stage-", dir=root))
    except OSError as e:
        raise CheckpointError(f"cannot stage a checkpoint for upload in {root or tempfile.gettempdir()}: "
                              f"{e.strerror or e}; set {STAGING_VAR} to a local directory with room for one "
                              "entry") from None
    try:
        yield tmp / name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
