"""Read the launch topology from environment variables, without touching torch.distributed.

Pure parsing: :func:`read_env` takes a mapping (``os.environ`` by default) and returns a
:class:`LaunchEnv`, or raises :class:`~launcher.errors.LaunchError` for environments that would make
processes train alone or collide. Sources, in order of precedence:

* ``RANK``/``WORLD_SIZE`` present: torchrun (or ``accelerate launch --multi_gpu``, which runs torchrun).
  ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` (node rank), ``GROUP_WORLD_SIZE`` (node count),
  ``MASTER_ADDR``/``MASTER_PORT``.
* otherwise ``SLURM_NTASKS > 1``: ``srun`` tasks. ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NODEID`` and
  ``SLURM_NTASKS_PER_NODE`` or ``SLURM_TASKS_PER_NODE`` (``"4(x2),3"``); ``MASTER_ADDR``/``MASTER_PORT`` when
  exported, else the step's first node and a port from the job id (:mod:`launcher.slurm`, which asks
  ``scontrol``: the one thing here that is not pure parsing).
* otherwise one process (launcher ``"none"``, or ``"accelerate"`` for ``accelerate launch`` of one process).

The launcher is labelled ``"accelerate"`` whenever ``ACCELERATE_MIXED_PRECISION`` or ``ACCELERATE_USE_CPU``
is set (``accelerate launch`` always sets the first), but the world is always read from the variables
above, never from accelerate's own state.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from . import slurm
from .errors import LaunchError

LAUNCHERS = ("none", "torchrun", "accelerate", "slurm")

_SLURM_MASTER_FIX = (
    "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) and "
    "MASTER_PORT=<free port, e.g. 29500> in the sbatch script before srun"
)
_ACCEL_CPU_FIX = (
    "use ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --num_machines 1 "
    "--mixed_precision no --dynamo_backend no train.py ... (or unset MASTER_PORT if you meant one process)"
)

_ACCEL_MULTI_FIX = (
    "on machine R of M run ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_machines M --machine_rank R "
    "--num_processes <M x processes per machine> --main_process_ip HOST --main_process_port PORT train.py ..., "
    "or anytopo-launch --engine accelerate --nnodes M --node-rank R --master HOST:PORT train.py ..."
)


@dataclass(frozen=True)
class LaunchEnv:
    """The topology one process was started into, as its environment tells it."""

    launcher: str
    """``"none"``, ``"torchrun"``, ``"accelerate"`` or ``"slurm"``."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    """Processes on this node."""
    node_rank: int
    num_nodes: int
    master_addr: str | None
    """Rendezvous host, ``None`` when the environment names none (one process)."""
    master_port: int | None
    use_cpu: bool
    """``ACCELERATE_USE_CPU`` is true: stay on CPU even when CUDA is available."""


def read_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Parse the launch environment.

    Args:
        env: the variables to read; ``os.environ`` when omitted.

    Returns:
        The :class:`LaunchEnv` of this process.

    Raises:
        LaunchError: the variables are missing, malformed or contradict each other (see module doc).

    Example:
        >>> read_env({}).world_size
        1
    """
    env = os.environ if env is None else env
    accelerate = "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_USE_CPU" in env
    use_cpu = _truthy(env.get("ACCELERATE_USE_CPU", ""))

    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_torchrun(env, "accelerate" if accelerate else "torchrun", use_cpu)

    present = [k for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK") if k in env]
    if present:
        raise LaunchError(
            f"{'/'.join(present)} set but RANK/WORLD_SIZE are not, so each process would believe it is alone: "
            "launch with torchrun (it sets all of them) or export RANK and WORLD_SIZE as well"
        )

    if _int(env, "SLURM_NTASKS", default=1) > 1:
        if "SLURM_JOB_ID" in env and "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
            # sbatch's batch step (or an salloc shell): ONE process on the first node; the tasks of the
            # allocation only exist once srun starts them.
            raise LaunchError(
                f"SLURM_NTASKS={env['SLURM_NTASKS']} describes the allocation, but this process runs in the sbatch "
                "batch step (no SLURM_STEP_ID), which is one process on the first node: start the tasks with "
                "`srun python train.py --strategy ddp ...` in the batch script, or print a ready one with "
                "`anytopo-launch --nnodes N --nproc-per-node K --slurm train.py ...`"
            )
        return _from_slurm(env, use_cpu)

    if accelerate and "MASTER_PORT" in env and not _is_loopback(env.get("MASTER_ADDR", "127.0.0.1")):
        # `accelerate launch --cpu --num_machines M --main_process_ip HOST` also starts one plain process per
        # machine; its MASTER_ADDR names another host.
        raise LaunchError(
            "accelerate launch asked for several machines but started one process with no RANK/WORLD_SIZE "
            f"(what `accelerate launch --cpu --num_machines M` does), so it would train alone: {_ACCEL_MULTI_FIX}"
        )
    if accelerate and "MASTER_PORT" in env:
        # `accelerate launch --cpu --num_processes 2` (or --num_processes 2 without --multi_gpu) starts ONE
        # process via its simple launcher; the only trace of the requested world is MASTER_ADDR/MASTER_PORT,
        # which accelerate sets only when num_processes > 1 or num_machines > 1.
        raise LaunchError(
            "accelerate launch asked for several processes but started one with no RANK/WORLD_SIZE "
            f"(what `accelerate launch --cpu --num_processes N` does), so it would train alone: {_ACCEL_CPU_FIX}"
        )

    return LaunchEnv(
        launcher="accelerate" if accelerate else "none", rank=0, world_size=1, local_rank=0,
        local_world_size=1, node_rank=0, num_nodes=1, master_addr=None, master_port=None, use_cpu=use_cpu,
    )


def _from_torchrun(env: Mapping[str, str], launcher: str, use_cpu: bool) -> LaunchEnv:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        have, miss = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
        raise LaunchError(f"{have} is set but {miss} is not: launch with torchrun or export both")
    world = _int(env, "WORLD_SIZE")
    rank = _int(env, "RANK")
    if world < 1:
        raise LaunchError(f"WORLD_SIZE={world} must be at least 1: launch with torchrun --nproc_per_node=N")
    if not 0 <= rank < world:
        raise LaunchError(
            f"RANK={rank} is outside [0, WORLD_SIZE={world}): two processes disagree on the world; "
            "launch all of them with the same torchrun --nnodes/--nproc_per_node"
        )
    if world > 1:
        missing = [k for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise LaunchError(
                f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun "
                "(it sets them) or export them too"
            )
    local_rank = _int(env, "LOCAL_RANK", default=0)
    lws = _int(env, "LOCAL_WORLD_SIZE", default=1)
    num_nodes = _int(env, "GROUP_WORLD_SIZE", default=0) or None
    node_rank = _int(env, "GROUP_RANK", default=-1)
    if node_rank < 0:
        node_rank = rank // lws if lws > 0 else 0  # uniform nodes assumed when the launcher does not say
    layout = _check_layout(rank, world, local_rank, lws, node_rank, num_nodes, nodes_uniform=num_nodes is None)
    return LaunchEnv(
        launcher=launcher, rank=rank, world_size=world, local_rank=local_rank, local_world_size=lws,
        node_rank=node_rank, num_nodes=layout, master_addr=env.get("MASTER_ADDR") or None,
        master_port=_int(env, "MASTER_PORT", default=0) or None, use_cpu=use_cpu,
    )


def _from_slurm(env: Mapping[str, str], use_cpu: bool) -> LaunchEnv:
    missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID") if k not in env]
    if missing:
        raise LaunchError(f"SLURM_NTASKS > 1 but {', '.join(missing)} not set: start the tasks with srun")
    world = _int(env, "SLURM_NTASKS")
    rank = _int(env, "SLURM_PROCID")
    local_rank = _int(env, "SLURM_LOCALID")
    node_rank = _int(env, "SLURM_NODEID")
    if not 0 <= rank < world:
        raise LaunchError(f"SLURM_PROCID={rank} is outside [0, SLURM_NTASKS={world}): start the tasks with srun")
    if "SLURM_NTASKS_PER_NODE" in env:
        lws = _int(env, "SLURM_NTASKS_PER_NODE")
        num_nodes, uniform = None, True
    elif "SLURM_TASKS_PER_NODE" in env:
        per_node = parse_tasks_per_node(env["SLURM_TASKS_PER_NODE"])
        if sum(per_node) != world:
            raise LaunchError(
                f"SLURM_TASKS_PER_NODE={env['SLURM_TASKS_PER_NODE']} adds up to {sum(per_node)}, not "
                f"SLURM_NTASKS={world}: start the tasks with one srun over the whole allocation"
            )
        if not 0 <= node_rank < len(per_node):
            raise LaunchError(
                f"SLURM_NODEID={node_rank} but SLURM_TASKS_PER_NODE lists {len(per_node)} nodes: "
                "start the tasks with srun"
            )
        lws, num_nodes, uniform = per_node[node_rank], len(per_node), len(set(per_node)) == 1
    else:
        raise LaunchError(
            "SLURM_NTASKS > 1 but neither SLURM_NTASKS_PER_NODE nor SLURM_TASKS_PER_NODE is set: "
            "start the tasks with srun"
        )
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        master_addr, master_port = env["MASTER_ADDR"], _int(env, "MASTER_PORT")
    elif slurm.in_step(env):  # rank 0's node (by name, or by the NodeAddr Slurm reaches it at), a port per job
        master_addr, master_port = slurm.master(env)
    else:
        raise LaunchError(f"SLURM job of {world} tasks but MASTER_ADDR/MASTER_PORT are not set: {_SLURM_MASTER_FIX}")
    layout = _check_layout(rank, world, local_rank, lws, node_rank, num_nodes, nodes_uniform=uniform)
    return LaunchEnv(
        launcher="slurm", rank=rank, world_size=world, local_rank=local_rank, local_world_size=lws,
        node_rank=node_rank, num_nodes=layout, master_addr=master_addr, master_port=master_port, use_cpu=use_cpu,
    )


def _check_layout(rank: int, world: int, local_rank: int, lws: int, node_rank: int,
                  num_nodes: int | None, *, nodes_uniform: bool) -> int:
    """Validate the node layout; return the node count (derived when uniform and not given)."""
    if lws < 1 or lws > world:
        raise LaunchError(
            f"LOCAL_WORLD_SIZE={lws} is outside [1, WORLD_SIZE={world}]: launch with torchrun --nproc_per_node"
        )
    if not 0 <= local_rank < lws:
        raise LaunchError(
            f"LOCAL_RANK={local_rank} is outside [0, LOCAL_WORLD_SIZE={lws}): two processes would share a "
            "device or each think it is alone; launch with torchrun --nproc_per_node"
        )
    if nodes_uniform and world % lws:
        raise LaunchError(
            f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={lws}: nodes disagree on the world; "
            "start every node with the same --nnodes and --nproc_per_node"
        )
    if num_nodes is None:
        num_nodes = world // lws
    if num_nodes < 1 or lws + (num_nodes - 1) > world:
        raise LaunchError(
            f"{num_nodes} nodes of which this one has {lws} processes cannot make WORLD_SIZE={world}: "
            "start every node with the same --nnodes and --nproc_per_node"
        )
    if not 0 <= node_rank < num_nodes:
        raise LaunchError(
            f"node rank {node_rank} is outside [0, {num_nodes} nodes): give each node a distinct "
            "--node_rank below --nnodes"
        )
    return num_nodes


_TASKS_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def parse_tasks_per_node(value: str) -> list[int]:
    """Expand SLURM's compressed tasks-per-node list: ``"4(x2),3"`` → ``[4, 4, 3]``.

    Raises:
        LaunchError: the value is not in SLURM's format.
    """
    out: list[int] = []
    for item in value.split(","):
        m = _TASKS_ITEM.match(item.strip())
        if not m:
            raise LaunchError(
                f"SLURM_TASKS_PER_NODE={value!r} is not like '4(x2),3': start the tasks with srun, "
                "or export SLURM_NTASKS_PER_NODE"
            )
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise LaunchError(f"{name} is not set: launch with torchrun/srun or export it")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer: unset it or launch with torchrun") from None


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _truthy(value: str) -> bool:
    # The spellings accelerate's str_to_bool accepts as true (it writes str(bool): "True"/"False").
    return value.strip().lower() in ("1", "y", "yes", "t", "true", "on")
