"""Pre-flight checks for a multi-node launch: each fails in seconds with one line naming the fix.

Everything here runs before ``torchrun``/``accelerate launch`` starts, on the node that will run it, and
only looks at this host (name resolution, its interfaces, one TCP connect or bind). Each check raises
:class:`~launcher.errors.LaunchError`; :func:`run_checks` runs them in the order a user would fix them.

What the checks catch, and what torch does without them (torch 2.x, measured in docs/multinode.md):

* the master's host name does not resolve — torchrun retries ``gai error`` for the whole rendezvous timeout;
* this host's own name resolves to loopback (the usual ``/etc/hosts``) on a multi-node run — gloo/NCCL
  advertise 127.0.0.1 to the other nodes, one rank fails with "Connection refused", its peers hang;
* the master port is taken on the master node; a worker cannot reach the master at all;
* more processes per node than visible GPUs; a script that does not exist; ``--node-rank`` with c10d
  (torchrun ignores it there: ranks go to whichever agent joins first).
"""
from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .errors import LaunchError

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
"""The variables gloo and NCCL read to pick the interface whose address they advertise to peers."""

RESOLVE_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5.0
_SIOCGIFADDR = 0x8915  # Linux ioctl: the IPv4 address of an interface


@dataclass(frozen=True)
class Target:
    """What one node is about to start: the facts the checks need (see :func:`run_checks`)."""

    script: str
    nnodes_max: int
    nproc_per_node: int
    rdzv: str
    """``"static"`` or ``"c10d"``."""
    node_rank: int | None
    """``None`` under c10d (the rendezvous assigns it)."""
    node_rank_given: bool
    master_host: str
    master_port: int
    ifname: str | None
    """The interface the run will pin gloo/NCCL to (``--ifname`` or the variables), ``None`` if unset."""
    gpus: int


def run_checks(t: Target, *, note: Callable[[str], None] = lambda msg: None) -> str | None:
    """Run every pre-flight check for this node; raise :class:`LaunchError` at the first failure.

    Args:
        t: what this node is about to start.
        note: called with a line worth telling the user that is not an error (e.g. the master is not up yet).

    Returns:
        The master's IPv4 address on a multi-node run, else ``None``.
    """
    check_script(t.script)
    check_node_rank(t)
    check_gpus(t.nproc_per_node, t.gpus)
    if t.nnodes_max == 1:
        return None
    master_ip = resolve(t.master_host, t.master_port)
    check_loopback_hostname(t, master_ip)
    local = is_local_address(master_ip)
    if t.rdzv == "static" and t.node_rank == 0:
        if not local:
            raise LaunchError(
                f"--node-rank 0 hosts the rendezvous, but the master {t.master_host} ({master_ip}) is not an "
                f"address of this host ({socket.gethostname()}): start node rank 0 on {t.master_host}, or pass "
                "--master with this host's address"
            )
        check_port_free(t.master_host, t.master_port)
    elif t.rdzv == "c10d" and local:
        # c10d: the agent on the master's host serves the store. With a loopback master every agent is on this
        # host and the first one to start serves it, so a bound port is no evidence of a conflict there.
        if not ipaddress.ip_address(master_ip).is_loopback:
            check_port_free(t.master_host, t.master_port)
    else:
        check_reachable(t.master_host, master_ip, t.master_port, note=note)
    return master_ip


def check_script(script: str) -> None:
    if not os.path.isfile(script):
        raise LaunchError(f"script {script!r} does not exist (cwd {os.getcwd()}): pass the path of the training "
                          "script, e.g. scripts/train.py")


def check_node_rank(t: Target) -> None:
    if t.rdzv == "c10d" and t.node_rank_given:
        raise LaunchError(
            "--node-rank is ignored by the c10d rendezvous (ranks go to the nodes in the order they join, so "
            "rank 0 and its checkpoints may land on any host): drop --node-rank, or use --rdzv static"
        )
    if t.rdzv == "static" and t.node_rank is not None and not 0 <= t.node_rank < t.nnodes_max:
        raise LaunchError(f"--node-rank {t.node_rank} is outside [0, {t.nnodes_max}): give each node a distinct "
                          f"rank below --nnodes (0 on the master)")


def check_gpus(nproc: int, gpus: int) -> None:
    if gpus and nproc > gpus:
        raise LaunchError(
            f"--nproc-per-node {nproc} but this node has {gpus} visible GPU(s), so GPUs would be shared: pass "
            f"--nproc-per-node {gpus} (or auto), or set CUDA_VISIBLE_DEVICES"
        )


def resolve(host: str, port: int, timeout_s: float = RESOLVE_TIMEOUT_S) -> str:
    """The IPv4 address ``host`` resolves to, within ``timeout_s`` (a stuck resolver cannot hold us)."""
    result: list = []

    def lookup() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
        except OSError as e:
            result.append(e)

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not result:
        why = f"no answer within {timeout_s:g}s"
    elif isinstance(result[0], OSError):
        why = getattr(result[0], "strerror", None) or str(result[0])
    else:
        return result[0]
    raise LaunchError(f"the master host {host!r} does not resolve ({why}): check the spelling, or pass its IP "
                      f"address: --master <ip>:{port}")


def check_loopback_hostname(t: Target, master_ip: str) -> None:
    """gloo/NCCL advertise the address of this host's name unless told an interface: loopback is useless."""
    if t.ifname or ipaddress.ip_address(master_ip).is_loopback:
        return  # pinned, or every node is this host (a localhost test): loopback is then right
    name = socket.gethostname()
    try:
        own = socket.getaddrinfo(name, None, socket.AF_INET)[0][4][0]
    except OSError:
        return  # gloo falls back to the interface that routes to the peers
    if not ipaddress.ip_address(own).is_loopback:
        return
    suggest = route_interface(master_ip)
    have = ", ".join(f"{n} {a}" for n, a in interfaces() if not ipaddress.ip_address(a).is_loopback) or "none"
    pick = suggest or "<interface>"
    raise LaunchError(
        f"this host's name {name!r} resolves to {own}, so gloo/NCCL would give the other nodes a loopback address "
        f"and they could never connect: pass --ifname {pick} (or --ifname auto), or export "
        f"GLOO_SOCKET_IFNAME={pick} NCCL_SOCKET_IFNAME={pick} on every node; interfaces with an address: {have}"
    )


def check_port_free(host: str, port: int) -> None:
    # SO_REUSEADDR as TCPStore sets it: a port with only TIME_WAIT connections left is free for the store.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise LaunchError(f"cannot bind the master port {port} on {host} ({e.strerror}): pick another "
                                  "--master HOST:PORT") from None
            raise LaunchError(
                f"the master port {port} is already in use on {host} (another run, or a leftover process): pick "
                f"another port, --master {host}:<port>, or stop what listens on {port} (ss -ltnp)"
            ) from None


def check_reachable(host: str, ip: str, port: int, *, timeout_s: float = CONNECT_TIMEOUT_S,
                    note: Callable[[str], None] = lambda msg: None) -> None:
    """A worker must be able to open TCP to the master. Refused is fine: the master is just not up yet."""
    try:
        with socket.create_connection((ip, port), timeout=timeout_s):
            return
    except ConnectionRefusedError:
        note(f"nothing listens on the master {host}:{port} yet; the rendezvous waits for it")
        return
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
    raise LaunchError(
        f"cannot open a TCP connection to the master {host}:{port} ({ip}) within {timeout_s:g}s ({why}): "
        "check that --master names an address of the master node that this host can reach (same network, "
        f"no firewall on port {port})"
    )


def is_local_address(ip: str) -> bool:
    """``ip`` is loopback or an address of one of this host's interfaces."""
    return ipaddress.ip_address(ip).is_loopback or any(a == ip for _, a in interfaces())


def interfaces() -> list[tuple[str, str]]:
    """``(name, IPv4 address)`` of every interface that has one, in kernel order (Linux)."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            out.append((name, socket.inet_ntoa(raw[20:24])))
    return out


def route_interface(ip: str) -> str | None:
    """The interface this host would send packets to ``ip`` from (no packet is sent), ``None`` if unknown."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))
            src = s.getsockname()[0]
    except OSError:
        return None
    return next((n for n, a in interfaces() if a == src), None)
