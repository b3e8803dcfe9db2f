"""Entry policy of a checkpoint directory: when to save, which entries to keep, and the ``latest`` and ``best``
pointers.

The rules are pure functions (``should_save``, ``is_better``, ``select_prune``), testable without a disk; the
rest does the small I/O around them on one directory of ``step-{N}`` entries. The step is read from each
entry's manifest, never parsed from its name. Nothing here is collective: ``CheckpointManager`` runs the
writing parts on the writer and tells every rank.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import CheckpointError
from .manifest import BEST_POINTER, MANIFEST, POINTER, Manifest, is_ours
from .objstore import S3Path, delete_tree, is_url
from .storage import atomic_write_text, read_json, recover_dirs

# ------------------------------------------------------------------------------------------------ rules


def should_save(step: int, every: int | None, *, last: bool = False) -> bool:
    """Save at every ``every``-th step (step > 0) and always at the last step."""
    return last or bool(every and every > 0 and step > 0 and step % every == 0)


def is_better(value: float, best: float, mode: str) -> bool:
    """``value`` strictly improves on ``best`` for ``mode`` "max" (accuracy, Dice) or "min" (a loss)."""
    return value > best if mode == "max" else value < best


def select_prune(steps: Sequence[int], keep_last: int | None, protect: Iterable[int] = ()) -> list[int]:
    """Steps to delete so that the newest ``keep_last`` (and every protected step) remain.

    ``keep_last`` of None or 0 keeps everything.
    """
    ordered = sorted(set(steps))
    if not keep_last or keep_last <= 0:
        return []
    keep = set(ordered[-keep_last:]) | set(protect)
    return [s for s in ordered if s not in keep]


def entry_name(step: int) -> str:
    return f"step-{step}"


# ------------------------------------------------------------------------------------- the directory

def scan_entries(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every entry with a readable anytopo manifest, oldest first."""
    out = []
    if not directory.is_dir():
        return out
    for p in directory.iterdir():
        m = p / MANIFEST
        if p.name.startswith(".") or not m.is_file():
            continue
        try:
            manifest = read_json(m)
        except CheckpointError:
            continue
        step = Manifest(manifest).step if is_ours(manifest) else None
        if step is not None:
            out.append((step, p))
    return sorted(out)


def point_latest(directory: Path, step: int) -> None:
    """Move ``latest`` to entry ``step`` (atomically: the old or the new name, never a torn file). On an object
    store there is no pointer: the newest committed entry is the latest, so nothing can point ahead of data."""
    if not is_url(directory):
        atomic_write_text(directory / POINTER, entry_name(step) + "\n")


def _write_text(path: Path, text: str) -> None:
    if isinstance(path, S3Path):
        path.put_bytes(text.encode())  # one PUT: the old or the new object, never a torn one
    else:
        atomic_write_text(path, text)


def remove_entry(path: Path) -> None:
    """Delete an entry: on an object store its manifest (the commit) first, so it stops existing before its
    objects go."""
    if isinstance(path, S3Path):
        delete_tree(path, first=MANIFEST)
    else:
        shutil.rmtree(path, ignore_errors=True)


def best_record(directory: Path) -> dict[str, Any] | None:
    """The ``best`` pointer's record ``{"entry", "step", "metric", "value", "mode"}``, or None."""
    path = directory / BEST_POINTER
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except CheckpointError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("value"), (int, float))
    return record if ok else None


def point_best(directory: Path, step: int, metric: str, value: float, mode: str) -> None:
    """Point ``best`` at entry ``step`` (which must exist), recording the metric that made it best."""
    if not (directory / entry_name(step) / MANIFEST).is_file():
        raise CheckpointError(f"update_best: no entry {entry_name(step)} in {directory}; save it first")
    record = {"entry": entry_name(step), "step": step, "metric": metric, "value": value, "mode": mode}
    _write_text(directory / BEST_POINTER, json.dumps(record) + "\n")


def prune(directory: Path, keep_last: int | None, protect: int) -> None:
    """Delete entries beyond the newest ``keep_last``, never ``protect`` nor the entry ``best`` points to."""
    entries = dict(scan_entries(directory))
    best = best_record(directory)
    protected = [protect] + ([best["step"]] if best else [])  # the best entry is never pruned while best
    for step in select_prune(list(entries), keep_last, protect=protected):
        remove_entry(entries[step])
    if is_url(directory) and entries:
        # objects of saves that never committed (a crash mid-upload), older than the newest committed entry
        committed = {p.name for p in entries.values()}
        newest = max(entries)
        for p in directory.glob("step-*"):
            number = p.name[len("step-"):]
            if p.name not in committed and number.isdigit() and int(number) < newest:
                delete_tree(p)


def clean_temps(directory: Path) -> None:
    """Put back an entry whose commit was interrupted between its two renames (``storage.recover_dirs``),
    then remove what interrupted saves left: entry temp dirs and pointer temp files."""
    if is_url(directory) or not directory.is_dir():
        return  # an object store: nothing is renamed, a save that never committed is invisible (prune removes it)
    recover_dirs(directory)
    for pattern in (".step-*", f".{POINTER}.*.tmp", f".{BEST_POINTER}.*.tmp"):
        for p in directory.glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
