"""The error type of the checkpoint package, the helpers that keep every message one line, and how every rank
learns that the writer's save failed (``agree_written``)."""
from __future__ import annotations

from typing import Any, Iterable

import collective


class CheckpointError(Exception):
    """A checkpoint could not be read, written or matched.

    The message is one line that names the problem and the fix. The CLI prints it without a traceback
    (unless ``--debug``) and exits with code 2.
    """


def first_line(e: BaseException) -> str:
    """The first non-blank line of ``str(e)``, or the exception's type name when the message is empty.

    Example:
        >>> first_line(RuntimeError("bad header\\n  at offset 8"))
        'bad header'
    """
    return next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)


def and_more(items: Iterable[object], limit: int) -> str:
    """``"a, b, c and 4 more"``: the first ``limit`` items, then how many were left out.

    Example:
        >>> and_more(["x", "y", "z"], 2)
        'x, y and 1 more'
    """
    items = list(items)
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


class CheckpointWriteError(CheckpointError, OSError):
    """The writer's OSError, worded for users: still an OSError for callers that catch those."""


def agree_written(error: BaseException | None, path: Any) -> None:
    """After a write only the writer did: every rank learns its outcome and fails if it failed.

    Without this a rank other than 0 returned success for a checkpoint that was never written. The writer
    re-raises its own error (an OSError becomes a ``CheckpointWriteError`` naming the path and the fix, so
    scripts exit 2 on every rank alike); the others raise one line naming rank 0's failure. A collective.
    """
    def fail(failure: collective.Failure, own: BaseException | None) -> BaseException:
        if own is not None:
            if isinstance(own, OSError) and not isinstance(own, CheckpointError):
                wrapped = CheckpointWriteError(f"cannot write checkpoint {path}: {own}; choose a writable location "
                                               "(an existing directory you may write to, with free space)")
                wrapped.__cause__ = own
                return wrapped
            return own
        plain = failure.kind in (CheckpointError.__name__, CheckpointWriteError.__name__)
        outcome = failure.line if plain else f"{failure.kind}: {failure.line}"
        return CheckpointError(f"checkpoint {path} was not written: rank 0 failed ({outcome}); fix that and save again")

    collective.conclude(error, fail=fail)
