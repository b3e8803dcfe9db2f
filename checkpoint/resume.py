"""Which checkpoint to resume: the verified ``latest`` or ``best`` entry of a directory, a path the user gave,
and the one choice every rank of a process group agrees on (``resolve_agreed``).

An entry is chosen only when every file its manifest lists is present with its sha256 (``verifies``); the
entries checked in this process are remembered (``VERIFIED``), so choosing an entry and then loading it hashes
each file once, not twice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import collective

from .errors import CheckpointError
from .manifest import MANIFEST, POINTER, Manifest, read_pointer, verify_files
from .objstore import as_path, is_url
from .policy import best_record, scan_entries
from .storage import read_json, recover_dirs, sha256_file


class VerifiedEntries:
    """Entries whose sha256 were checked in this process, keyed by path and manifest mtime (a rewritten entry
    is checked again)."""

    def __init__(self) -> None:
        self._keys: set[tuple[str, int]] = set()

    @staticmethod
    def _key(path: Path) -> tuple[str, int]:
        try:
            return str(path.resolve()), (path / MANIFEST).stat().st_mtime_ns
        except OSError:
            return str(path), -1

    def add(self, path: Path) -> None:
        self._keys.add(self._key(path))

    def __contains__(self, path: Path) -> bool:
        return self._key(path) in self._keys

    def clear(self) -> None:
        self._keys.clear()


VERIFIED = VerifiedEntries()


def verifies(path: Path) -> bool:
    """Whether entry ``path`` is complete: every file its manifest lists present, of its size and sha256."""
    try:
        manifest = read_json(path / MANIFEST)
        verify_files(path, manifest, hashes=True)
    except (CheckpointError, OSError):
        return False
    if not manifest.get("files"):
        return False
    VERIFIED.add(path)
    return True


def latest(directory: Path) -> Path | None:
    """The entry ``latest`` points to if it verifies (sha256 of every file), else the newest entry that does;
    None when there is none. An entry whose commit was interrupted mid-swap is put back first."""
    if not is_url(directory):
        recover_dirs(directory)
    name = read_pointer(directory / POINTER)  # None for a missing, torn or binary pointer: fall back to the scan
    if name:
        target = directory / name
        if target.parent == directory and verifies(target):
            return target
    for _, path in reversed(scan_entries(directory)):
        if verifies(path):
            return path
    return None


def best(directory: Path) -> Path | None:
    """The entry ``best`` points to, if it verifies; else None."""
    record = best_record(directory)
    if record is None:
        return None
    target = directory / str(record.get("entry"))
    if target.parent == directory and verifies(target):
        return target
    return None


def resolve(directory: Path, path: str | Path | None = None) -> Path:
    """The checkpoint to restore: ``path`` itself, or for None the verified latest entry of ``directory``,
    or for another manager's directory that one's verified latest entry."""
    if path is None:
        found = latest(directory)
        if found is None:
            raise CheckpointError(f"no checkpoint in {directory}; start without --resume or point at one")
        return found
    path = as_path(path)
    if path.is_dir() and not (path / MANIFEST).is_file() and \
            ((path / POINTER).is_file() or (is_url(path) and scan_entries(path))):  # a run's checkpoint dir
        found = latest(path)
        if found is None:
            raise CheckpointError(f"{path}: no entry verifies (all damaged or incomplete); point at a good entry")
        return found
    return path


def resolve_agreed(directory: Path, path: str | Path | None = None, *, missing_ok: bool = False) -> Path | None:
    """``resolve(directory, path)`` decided by rank 0 and checked by every rank: the one way to pick the
    checkpoint to resume under a process group (without one it is ``latest``/``resolve`` plus the check that
    an explicit entry verifies). A collective.

    Rank 0 alone resolves the entry (for ``path`` None: the verified latest of ``directory``; None when there is
    none and ``missing_ok``; ``"best"``: the verified best), checks the sha256 of every file, and broadcasts
    the entry's path, step and manifest sha256 (or its error). Every other rank then checks that it sees that
    same entry, in ITS directory when rank 0's entry lies in rank 0's, without re-hashing the files: the
    manifest, which holds every file's sha256, must hash the same. Any rank that does not makes every rank
    raise the same one-line CheckpointError, so no rank trains from another step.
    """
    claim = collective.decide(lambda: _claim(directory, path, missing_ok),
                              fail=lambda failure, own: CheckpointError(str(failure)))
    if claim["error"]:
        raise CheckpointError(claim["error"])
    mine, problem = _check_claim(directory, claim, collective.rank(), auto=path is None)
    problem = collective.first_problem(problem)
    if problem:
        raise CheckpointError(problem)
    if mine is not None and claim["manifest_sha256"]:
        VERIFIED.add(mine)  # rank 0 hashed every file; the manifests match
    return mine


def _claim(directory: Path, path: str | Path | None, missing_ok: bool) -> dict[str, Any]:
    """Rank 0's resolution of ``path``, as plain values to broadcast."""
    claim: dict[str, Any] = {"error": None, "path": None, "in_directory": False, "directory": str(directory),
                             "step": None, "manifest_sha256": None, "size": None}
    try:
        if path is not None and path != "best" and not as_path(path).exists():
            raise CheckpointError(f"{path}: no such file or directory; point at a checkpoint entry, a run's "
                                  "checkpoints/ directory or a weights file")
        if path == "best":  # resolved here, on rank 0 alone, like "latest": the others check the claim
            found = best(directory)
            if found is None:
                why = "has no best entry yet" if best_record(directory) is None else \
                    "has a best pointer whose entry does not verify"
                raise CheckpointError(f"{directory} {why}; use --resume auto or a checkpoint path")
        else:
            found = latest(directory) if path is None else resolve(directory, path)
        if found is None and not missing_ok:
            raise CheckpointError(f"no checkpoint in {directory}; start without --resume or point at one")
    except CheckpointError as e:
        return {**claim, "error": str(e)}
    if found is None:
        return claim
    claim.update(path=str(found), in_directory=found.parent == directory)
    manifest = found / MANIFEST if found.is_dir() else None
    if manifest is not None and manifest.is_file():
        if found not in VERIFIED and not verifies(found):
            return {**claim, "error": f"{found}: a file is missing or fails its sha256 in the manifest (damaged "
                                      "or incomplete entry); resume another entry or the run's checkpoints/ directory"}
        claim.update(step=Manifest(read_json(manifest)).step, manifest_sha256=sha256_file(manifest))
    elif found.is_file():
        claim["size"] = found.stat().st_size
    return claim


def _check_claim(directory: Path, claim: dict[str, Any], rank: int, *, auto: bool) -> tuple[Path | None, str | None]:
    """The entry this rank resumes for rank 0's ``claim``, and the problem if it does not see the same one."""
    shared = "the checkpoint directory must be shared by all nodes (a shared filesystem, same --output-dir)"
    if claim["path"] is None:
        if auto and rank != 0 and scan_entries(directory):
            return None, (f"rank {rank} finds checkpoints in {directory} but rank 0 finds none in "
                          f"{claim['directory']}: {shared}")
        return None, None
    theirs = as_path(claim["path"])
    mine = directory / theirs.name if claim["in_directory"] else theirs
    if rank == 0:
        return mine, None
    where = f"rank 0 resumes {theirs}" + (f" (step {claim['step']})" if claim["step"] is not None else "")
    if claim["manifest_sha256"] is not None:
        if not (mine / MANIFEST).is_file():
            return mine, f"rank {rank} does not see {mine} ({where}): {shared}"
        if sha256_file(mine / MANIFEST) != claim["manifest_sha256"]:
            return mine, f"rank {rank} sees a different {mine} than rank 0 ({where}): {shared}"
    elif not mine.is_file() or mine.stat().st_size != claim["size"]:
        return mine, f"rank {rank} does not see the same file {mine} ({where}): {shared}"
    return mine, None
