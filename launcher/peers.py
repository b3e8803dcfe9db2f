"""A peer lost in the middle of a collective, said in one line that names it.

When a rank, or the node it runs on, dies while the others are inside an ``all_reduce``, the survivors get a
``RuntimeError``/``DistBackendError`` from the backend: gloo's ``Read error [10.0.0.2]:27830: Connection reset by
peer`` or ``Connection closed by peer [10.0.0.2]:50842``, NCCL's ``remote process exited or there was a network
error``. Shown as a traceback on every rank, that text is long, repeated and names an address at best. Here it
becomes one line per surviving rank: which rank saw it, where, the peer's address and, inside a Slurm job, the
node that has that address (by name, or by the ``NodeAddr`` Slurm uses), and what happens next.
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping

from . import slurm
from .errors import LaunchError

# gloo (third_party/gloo/gloo/transport/tcp/pair.cc) and NCCL's texts when the other end of a connection went away
_LOST = re.compile(r"Connection (?:closed|reset) by peer|Broken pipe|remote process exited|"
                   r"NCCL communicator was aborted|Socket Timeout|Connection refused", re.I)
_PEER = re.compile(r"\[([0-9a-fA-F.:]+)\]:(\d+)")


def lost_peer(err: BaseException) -> tuple[str, str | None] | None:
    """``(reason, peer address or None)`` when ``err`` (or its cause) says a peer's connection went away;
    ``None`` for any other error."""
    seen: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in seen:
        seen.append(e)
        text = str(e)
        m = _LOST.search(text)
        if m and isinstance(e, (RuntimeError, ConnectionError, OSError)):
            peer = _PEER.search(text)
            return m.group(0), (peer.group(1) if peer else None)
        e = e.__cause__ or e.__context__
    return None


def node_of(address: str, env: Mapping[str, str] | None = None) -> str | None:
    """The Slurm node of this job whose name resolves to ``address`` or whose ``NodeAddr`` is it; ``None``
    outside Slurm or when no node has it (asking Slurm is bounded by ``slurm.SCONTROL_TIMEOUT_S``)."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        wanted = ipaddress.ip_address(address)
        for name in slurm.hosts(nodelist, env):
            addr = slurm.node_address(name, env)
            try:
                infos = socket.getaddrinfo(addr, None)
            except OSError:
                continue
            if any(ipaddress.ip_address(i[4][0]) == wanted for i in infos):
                return name
    except (LaunchError, ValueError):
        return None
    return None


def describe(err: BaseException, *, rank: int, world_size: int, env: Mapping[str, str] | None = None) -> str | None:
    """One line for a peer lost mid-collective on this rank; ``None`` when ``err`` is something else."""
    hit = lost_peer(err)
    if hit is None:
        return None
    reason, address = hit
    env = os.environ if env is None else env
    here = socket.gethostname()
    if address is None:
        who = "a peer"
    else:
        node = node_of(address, env)
        who = f"the peer at {address}" + (f" (node {node}{', this node' if node == here else ''})" if node else "")
    return (f"rank {rank}/{world_size} on {here}: {who} went away during a collective ({reason}): a rank or its "
            "node died; the survivors stop here. Restarted with --resume auto (torchrun --max-restarts, a "
            "requeued Slurm job) the run continues from its newest checkpoint")
