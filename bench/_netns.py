"""Two "hosts" on one machine: network namespaces joined by a veth pair (root only), for multi-node tests.

Each namespace has loopback and one veth end with an address in a private /24 (10.231.N.1 and .2) that
exists only inside these namespaces; nothing is routed anywhere else. Commands run in a namespace with
``ip netns exec``; the filesystem is shared, as a cluster's would be. :func:`two_hosts` always deletes the
namespaces (and with them the veth pair), also when the body fails.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    ns: str
    ifname: str
    addr: str

    def cmd(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def unavailable() -> str | None:
    """Why two namespaces cannot be made here, or ``None`` if they can."""
    if os.geteuid() != 0:
        return "needs root for `ip netns add`"
    probe = f"atprobe{os.getpid()}"
    try:
        made = _ip("netns", "add", probe)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@contextmanager
def two_hosts(tag: int | None = None) -> Iterator[tuple[Host, Host]]:
    """Namespaces ``at<tag>a`` / ``at<tag>b`` with 10.231.<tag % 250>.1 / .2 on a veth pair."""
    tag = os.getpid() % 100000 if tag is None else tag
    net = f"10.231.{tag % 250}"
    a = Host(f"at{tag}a", f"at{tag}va", f"{net}.1")
    b = Host(f"at{tag}b", f"at{tag}vb", f"{net}.2")
    try:
        steps = [
            ("netns", "add", a.ns), ("netns", "add", b.ns),
            ("link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname),
            ("link", "set", a.ifname, "netns", a.ns), ("link", "set", b.ifname, "netns", b.ns),
        ]
        for h in (a, b):
            steps += [("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.ifname),
                      ("-n", h.ns, "link", "set", h.ifname, "up"), ("-n", h.ns, "link", "set", "lo", "up")]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                raise RuntimeError(f"ip {' '.join(step)}: {done.stderr.strip()}")
        yield a, b
    finally:
        for h in (a, b):
            pids = _ip("netns", "pids", h.ns).stdout.split()
            for pid in pids:  # only processes this test started can live in a namespace it made
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", h.ns)
        _ip("link", "del", a.ifname)  # in case it never moved into a namespace
