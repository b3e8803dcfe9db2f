"""The one exception a launch problem raises.

A ``LaunchError`` means the processes were started in a way that would train wrongly (or not at all):
its message is one line that names the problem *and* the fix. It is a user error, not a bug, so an entry
script prints it and exits with :attr:`LaunchError.exit_code` (2, like argparse) without a traceback::

    def main(argv=None) -> int:
        try:
            with launcher.distributed(args.strategy) as info:
                ...
        except launcher.LaunchError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        return 0
"""
from __future__ import annotations


class LaunchError(Exception):
    """The launch configuration is wrong; ``str(err)`` is one line naming the problem and the fix."""

    #: Exit status an entry script should return for this error (argparse uses 2 for usage errors).
    exit_code: int = 2
