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

import os
import signal
import threading
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


def preemption_signals(extra: Sequence[str] = ()) -> list[signal.Signals]:
    """SIGTERM and the ``extra`` signals (names or numbers, see :func:`parse_signal`), each once."""
    return [signal.SIGTERM] + [s for s in (parse_signal(e) for e in extra) if s != signal.SIGTERM]


def leave_signals_to_main(signals: Sequence[int], worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn`` (``functools.partial(leave_signals_to_main, signals)``): the worker
    ignores the preemption ``signals``, which the main process owns.

    Schedulers signal every process of a job (Slurm) or a worker's whole process group (torchrun's agent
    ``killpg``s each rank), so a SIGTERM reaches a rank's DataLoader workers too; torch's worker handler then
    ends the worker, the rank's next batch fails, and the preemption checkpoint is never written. Here SIGTERM
    is only taken from the worker's parent (``multiprocessing``'s ``terminate()``, the one way the main process
    itself stops a worker): a thread reads it with ``sigwaitinfo``, which tells who sent it. The other signals
    are ignored. The main process shuts its workers down as usual when it stops; a worker whose parent died
    ends by torch's own check of its parent."""
    for sig in signals:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)
    if signal.SIGTERM in signals:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask
        threading.Thread(target=_sigterm_from_parent_only, args=(os.getppid(),), name="anytopo-sigterm",
                         daemon=True).start()


def _sigterm_from_parent_only(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)  # what torch's own handler does for its parent's SIGTERM (no error report in the parent)


class Preemption:
    """Handlers for SIGTERM and ``extra`` signals that set a flag; a context manager that restores the
    previous handlers on exit.

    Args:
        extra: more signals to treat as a preemption notice (names or numbers, see :func:`parse_signal`).
    """

    def __init__(self, extra: Sequence[str] = ()):
        self.signals = preemption_signals(extra)
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
