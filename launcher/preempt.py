"""Preemption: a signal asks the run to stop at the next step boundary, and every rank stops there together.

SLURM, Kubernetes and cloud schedulers send SIGTERM (SLURM's ``--signal`` may send another, e.g. SIGUSR1)
some time before they kill a job. :class:`Preemption` turns that signal into a flag and nothing else: the
handler does no I/O and takes no lock, so a signal that arrives in the middle of a checkpoint write (a
second SIGTERM included) cannot interrupt or corrupt it. The training loop asks :meth:`Preemption.agreed`
at each step boundary; it all-reduces the flag, so one signalled rank stops every rank at the same step.
What to do then (save, exit with :data:`PREEMPTED_EXIT_CODE`) is the caller's business: this module knows
nothing of checkpoints::

    with Preemption(["SIGUSR1"]) as preempt:          # SIGTERM is always handled
        for step in ...:
            train_step()
            if preempt.agreed():
                save(); return PREEMPTED_EXIT_CODE
"""
from __future__ import annotations

import signal
from collections.abc import Sequence
from types import FrameType

import collective

from .errors import LaunchError

#: Exit status of a run that stopped for a signal after writing its checkpoint: 128 + SIGTERM, what shells,
#: SLURM and Kubernetes report for a process ended by SIGTERM. Non-zero on purpose: torchrun counts it as a
#: failure, so with restarts left it restarts the group, which resumes the checkpoint by itself; SLURM's
#: ``--requeue`` requeues a preempted job whatever the code, and a job script can requeue on 143 itself.
PREEMPTED_EXIT_CODE = 143


def parse_signal(name: str) -> signal.Signals:
    """``"SIGUSR1"``, ``"USR1"`` or ``"10"`` -> ``signal.SIGUSR1``.

    Raises:
        LaunchError: not a signal name or number of this platform, or one that cannot be handled
            (SIGKILL, SIGSTOP).
    """
    text = str(name).strip().upper()
    try:
        sig = signal.Signals(int(text)) if text.isdigit() else signal.Signals[text if text.startswith("SIG") else "SIG" + text]
    except (KeyError, ValueError):
        raise LaunchError(f"unknown signal {name!r}: use a name such as SIGUSR1 or SIGTERM") from None
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        raise LaunchError(f"{sig.name} cannot be caught: use SIGTERM or SIGUSR1 for --preempt-signal")
    return sig


class Preemption:
    """Handlers for SIGTERM and ``extra`` signals that set a flag; a context manager that restores the
    previous handlers on exit.

    Args:
        extra: more signals to treat as a preemption notice (names or numbers, see :func:`parse_signal`).
    """

    def __init__(self, extra: Sequence[str] = ()):
        self.signals = [signal.SIGTERM] + [s for s in (parse_signal(e) for e in extra) if s != signal.SIGTERM]
        self.received: list[str] = []
        """Names of the signals received, in order (the handler only appends)."""
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum).name)

    def install(self) -> "Preemption":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "Preemption":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    @property
    def requested(self) -> bool:
        """A signal reached THIS process (other ranks may not know yet: use :meth:`agreed`)."""
        return bool(self.received)

    def agreed(self) -> bool:
        """Whether any rank received a signal: a collective (``collective.any_rank``), so every rank must call
        it at the same step. A loop that has more stop reasons folds them into one ``any_rank`` call instead."""
        return collective.any_rank(self.requested)[0]
