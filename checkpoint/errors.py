"""The one error type of the checkpoint package, and the two helpers that keep every message one line."""
from __future__ import annotations

from typing import Iterable


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
