"""What a Slurm job tells a launcher: its nodes, where rank 0 is and how to reach it, its restarts.

Under ``srun`` every task knows its job (``SLURM_JOB_ID``), its step's nodes (``SLURM_STEP_NODELIST``,
compressed: ``node[1-2]``) and its node's index in them (``SLURM_NODEID``). Rank 0 lives on the step's first
node; its address is that node's name when the name resolves, else the ``NodeAddr`` Slurm itself uses to reach
it (``scontrol show node``): clusters that address nodes by an InfiniBand or private address often give them
names no resolver knows. The port is derived from the job id, so two jobs sharing a node do not collide.
Nothing here guesses: the node names come from ``scontrol show hostnames`` (Slurm's own hostlist syntax), and a
question ``scontrol`` cannot answer is a :class:`LaunchError` naming the fix.
"""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Mapping

from .errors import LaunchError

PORT_BASE, PORT_SPAN = 20000, 40000
SCONTROL_TIMEOUT_S = 15.0


def in_job(env: Mapping[str, str]) -> bool:
    return bool(env.get("SLURM_JOB_ID"))


def in_step(env: Mapping[str, str]) -> bool:
    """A task started by ``srun`` (a job step), not the batch script itself."""
    return in_job(env) and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)


def job_port(env: Mapping[str, str]) -> int:
    """The rendezvous port of this job: the same on every node, different for jobs sharing a node."""
    return PORT_BASE + int(env["SLURM_JOB_ID"]) % PORT_SPAN


def num_nodes(env: Mapping[str, str]) -> int | None:
    """Nodes of this step (``srun`` over part of an allocation), else of the job."""
    for var in ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if env.get(var, "").isdigit():
            return int(env[var])
    return None


def scontrol(*args: str, env: Mapping[str, str] | None = None) -> str:
    exe = shutil.which("scontrol", path=(env or {}).get("PATH")) or shutil.which("scontrol")
    if exe is None:
        raise LaunchError("scontrol is not on PATH in this job: load Slurm's client tools, or pass --master HOST:PORT")
    try:
        done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S,
                              env=dict(env) if env is not None else None)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"scontrol {' '.join(args)} got no answer in {SCONTROL_TIMEOUT_S:g}s: is slurmctld up? "
                          "Pass --master HOST:PORT to do without it") from None
    if done.returncode != 0:
        raise LaunchError(f"scontrol {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}; pass "
                          "--master HOST:PORT to do without it")
    return done.stdout


def hosts(nodelist: str, env: Mapping[str, str] | None = None) -> list[str]:
    """``node[1-2],gpu7`` -> ``["node1", "node2", "gpu7"]``, as Slurm expands it."""
    return scontrol("show", "hostnames", nodelist, env=env).split()


def node_address(name: str, env: Mapping[str, str] | None = None) -> str:
    """How to reach node ``name``: the name itself when it resolves, else its ``NodeAddr`` from Slurm."""
    try:
        socket.getaddrinfo(name, None, socket.AF_INET)
        return name
    except OSError:
        pass
    out = scontrol("-o", "show", "node", name, env=env)
    m = re.search(r"\bNodeAddr=(\S+)", out)
    if not m:
        raise LaunchError(f"node {name!r} does not resolve and Slurm lists no NodeAddr for it: pass --master <ip>:PORT")
    return m.group(1)


def master(env: Mapping[str, str]) -> tuple[str, int]:
    """(address, port) of rank 0 for this job step: its first node, reachable by name or by NodeAddr."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("in a Slurm job but SLURM_JOB_NODELIST is not set: start the tasks with srun, or pass "
                          "--master HOST:PORT")
    first = hosts(nodelist, env)[0]
    return node_address(first, env), job_port(env)


def restart_count(env: Mapping[str, str]) -> int:
    """How often Slurm requeued this job (``SLURM_RESTART_COUNT``; 0 for its first run)."""
    value = env.get("SLURM_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0
