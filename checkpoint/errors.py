"""The one error type of the checkpoint package."""


class CheckpointError(Exception):
    """A checkpoint could not be read, written or matched.

    The message is one line that names the problem and the fix. The CLI prints it without a traceback
    (unless ``--debug``) and exits with code 2.
    """
