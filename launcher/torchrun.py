"""``python -m launcher.torchrun ARGS`` is ``torchrun ARGS``, except that a rendezvous that fails ends in one line,
and a signal the agent forwards (SIGTERM, SIGUSR1 for SLURM's --signal, ...) ends it with exit status 143 after
the workers stopped, instead of a traceback.

torchrun's own agent starts, watches and restarts the processes (this module calls
``torch.distributed.run.main``, the function behind the ``torchrun`` console script). Only the rendezvous
failures are rewritten, because torch reports them as a traceback whose last line says
``RendezvousTimeoutError`` (no text) or ``Timed out after 901 seconds waiting for clients. 1/2 clients
joined.`` (no address, no fix). Here they end as ``error: ...`` with the elapsed time, how many nodes joined,
the address they waited on and what to do, and exit status 2. Workers that failed end in one line naming
them (their own errors come before it) and exit status 1, or 124 (``launcher.watchdog.HUNG_EXIT_CODE``) when
one of them ended because the watchdog found a hang, so that a job script can requeue the job.
"""
from __future__ import annotations

import os
import re
import socket
import sys
import time

from .errors import LaunchError
from .preempt import PREEMPTED_EXIT_CODE
from .watchdog import HUNG_EXIT_CODE

_JOINED = re.compile(r"(\d+)/(\d+) clients joined")
DEBUG_VAR = "ANYTOPO_DEBUG"
"""Set (to anything) to keep torch's own tracebacks and failure tables."""


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = sys.argv[1:] if argv is None else argv
    args = run.parse_args(argv)
    handlers = _capture_handlers()
    _one_shutdown_per_run()
    start = time.monotonic()
    try:
        run.main(argv)
    except SignalException as e:
        # torch's agent already sent the signal to the workers and waited for them (train.py checkpoints at its
        # next step and exits 143); what is left to say fits one line, and the status tells a job script to
        # requeue, or torchrun's caller to restart
        print(f"anytopo-launch: {e.sigval.name} received: the workers were told and have stopped (train.py "
              f"checkpoints first); exiting {PREEMPTED_EXIT_CODE} so the job can be requeued or restarted",
              file=sys.stderr, flush=True)
        return PREEMPTED_EXIT_CODE
    except ChildFailedError as e:
        if os.environ.get(DEBUG_VAR):
            raise
        print(f"anytopo-launch: {failed_workers(e)}", file=sys.stderr, flush=True)
        return HUNG_EXIT_CODE if any(f.exitcode == HUNG_EXIT_CODE for f in e.failures.values()) else 1
    except Exception as e:
        msg = explain(e, args, time.monotonic() - start, handlers)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return LaunchError.exit_code
    return 0


def failed_workers(e) -> str:
    """One line for torch's ``ChildFailedError``: which ranks of this node exited and how (their own errors are
    above it), instead of a traceback and a table whose "root cause" is whichever rank's second came first."""
    def how(code: int) -> str:
        if code < 0:
            import signal
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    parts = [f"rank {rank} (pid {f.pid}) {how(f.exitcode)}" for rank, f in sorted(e.failures.items())]
    return (f"{e.name} failed on {socket.gethostname()}: {', '.join(parts)} (each rank's own error is above; "
            f"{DEBUG_VAR}=1 for torch's traceback)")


def _one_shutdown_per_run() -> None:
    """torch's agent turns each handled signal into an exception that starts the workers' shutdown; a second
    signal during that shutdown (SLURM's ``scancel --full`` signals the agent directly AND through the batch
    script's srun; schedulers repeat SIGTERM) would interrupt the wait for the workers' checkpoint. So only the
    first one raises; the repeats are already being acted on."""
    import torch.distributed.elastic.multiprocessing.api as mp_api

    real = mp_api._terminate_process_handler
    seen: list[int] = []

    def first_only(signum, frame):
        if seen:
            return
        seen.append(signum)
        real(signum, frame)

    mp_api._terminate_process_handler = first_only


def explain(e: BaseException, args, elapsed: float, handlers: list) -> str | None:
    """One line for a rendezvous failure ``e`` of torchrun ``args``; ``None`` for anything else."""
    from torch.distributed import DistError
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousTimeoutError

    chain = _chain(e)
    hit = next((c for c in chain if isinstance(c, (RendezvousTimeoutError, RendezvousConnectionError, DistError))),
               None)
    if hit is None:
        return None
    backend = args.rdzv_backend
    endpoint = args.rdzv_endpoint or f"{args.master_addr}:{args.master_port}"
    nodes = args.nnodes
    max_nodes = int(str(nodes).split(":")[-1])
    waited = f"waited {elapsed:.0f} s"
    text = " ".join(str(c) for c in chain)
    fix_missing = (f"start the missing node(s) with the same --nnodes/--master, check that each can reach {endpoint}, "
                   "or raise --join-timeout")
    if backend == "static":
        m = _JOINED.search(text)
        if m:
            return (f"node {args.node_rank} (the master) {waited} at {endpoint} and {int(m.group(1))} of "
                    f"{m.group(2)} node(s) joined: {fix_missing}")
        if isinstance(hit, DistError) and args.node_rank != 0:
            return (f"node {args.node_rank} {waited} for the master's rendezvous store at {endpoint} and it never "
                    f"answered (0 of {max_nodes} nodes seen from here): start node rank 0 on "
                    f"{endpoint.rsplit(':', 1)[0]} with the same --master, or raise --join-timeout")
        return None
    joined = _c10d_joined(handlers)
    seen = f"{joined} of {nodes}" if joined is not None else f"fewer than {nodes.split(':')[0]} of {nodes}"
    if isinstance(hit, RendezvousTimeoutError):
        return f"this node {waited} at the c10d rendezvous {endpoint} and {seen} node(s) joined: {fix_missing}"
    if isinstance(hit, RendezvousConnectionError):
        return (f"this node {waited} for the c10d rendezvous store at {endpoint} and it never answered: start the "
                f"node whose address is {endpoint.rsplit(':', 1)[0]} (it hosts the store), or raise --join-timeout")
    return None


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _capture_handlers() -> list:
    """Keep the rendezvous handler torchrun creates, to count the c10d participants after a timeout."""
    import torch.distributed.launcher.api as api

    registry = api.rdzv_registry
    made: list = []
    real = registry.get_rendezvous_handler

    def capture(params):
        handler = real(params)
        made.append(handler)
        return handler

    registry.get_rendezvous_handler = capture
    return made


def _c10d_joined(handlers: list) -> int | None:
    # A private attribute of DynamicRendezvousHandler, read only to word the error: the last state this node
    # synced, plus itself (a node that times out leaves the participants before raising).
    try:
        handler = handlers[-1]
        state = handler._state_holder.state
        return len(set(state.participants) | {handler._this_node})
    except (IndexError, AttributeError):
        return None


if __name__ == "__main__":
    sys.exit(main())
