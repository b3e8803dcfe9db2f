"""Process-group setup from the launch environment: :func:`setup`, :func:`teardown`, :func:`distributed`.

``setup(strategy)`` is the one place a process learns its topology. It reads the environment (see
:mod:`launcher.env`), refuses launches that would silently train wrongly (:class:`LaunchError`), picks the
device and backend, creates the process group when the strategy needs one, checks that every rank agrees
on the world, and returns an immutable :class:`DistInfo`.

==========  =================================  ==================================================
strategy    world of 1                         world of N > 1 (torchrun, accelerate, srun)
==========  =================================  ==================================================
single      no process group                   LaunchError: each process would train alone
dp          no process group, device cuda:0     LaunchError: use ddp
ddp         group of 1 on 127.0.0.1, free port  group of N from MASTER_ADDR/MASTER_PORT (env://)
fsdp        as ddp                             as ddp (parameters sharded by ``fully_shard``)
==========  =================================  ==================================================
"""
from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .env import LaunchEnv, read_env
from .errors import LaunchError

STRATEGIES = ("single", "dp", "ddp", "fsdp")
GROUP_STRATEGIES = ("ddp", "fsdp")  # strategies that run one process per device in a process group

_log = logging.getLogger("anytopo.launcher")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run. Returned by :func:`setup`; never mutated."""

    rank: int
    """Global rank, 0 .. world_size-1."""
    local_rank: int
    """Rank on this node; also the CUDA device index under single/ddp."""
    world_size: int
    local_world_size: int
    node_rank: int
    device: torch.device
    """Where this process's model and batches live."""
    backend: str | None
    """``"gloo"``/``"nccl"`` when :func:`setup` created a process group, else ``None``."""
    launcher: str
    """``"none"``, ``"torchrun"``, ``"accelerate"`` or ``"slurm"``."""
    strategy: str
    """``"single"``, ``"dp"``, ``"ddp"`` or ``"fsdp"``."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, writes checkpoints and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group was created for this run by :func:`setup` (true for every ``ddp`` run)."""
        return self.backend is not None


class _Owned:
    """The process group (and, for a world of one, the store) that setup() created and teardown() ends."""

    group = False
    store: dist.TCPStore | None = None


def setup(strategy: str = "single", *, backend: str | None = None, timeout_s: float = 300) -> DistInfo:
    """Set up this process for ``strategy`` from the launch environment.

    Call it once, at the start of ``main()``, before anything else that touches ``torch.distributed``
    (``Accelerator()`` included), and pair it with :func:`teardown` — or use :func:`distributed`.

    Args:
        strategy: ``"single"`` (one process, one device), ``"dp"`` (one process, ``nn.DataParallel`` over
            the visible GPUs) or ``"ddp"`` (one process per device, ``DistributedDataParallel``). ``ddp``
            also runs as a plain ``python train.py``: it then makes a process group of one.
        backend: override the process-group backend (default: ``nccl`` on CUDA, ``gloo`` on CPU).
        timeout_s: how long to wait for the other ranks at start-up and in collectives.

    Returns:
        The :class:`DistInfo` of this process. With CUDA, ``torch.cuda.set_device(local_rank)`` is done.

    Raises:
        LaunchError: unknown strategy; a world of several processes with ``single``/``dp``; an
            ``accelerate launch --cpu --num_processes N`` that started one process; environment
            variables that contradict each other or disagree across ranks; more processes on a node
            than GPUs; the other ranks never arrived within ``timeout_s``; a process group already exists.

    Example:
        >>> info = setup("single")
        >>> info.world_size, info.distributed
        (1, False)
    """
    if strategy not in STRATEGIES:
        raise LaunchError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if dist.is_available() and dist.is_initialized():
        raise LaunchError(
            "a torch.distributed process group already exists (setup() called twice, or Accelerator() "
            "before it): call launcher.setup() once, first, and teardown() before setting up again"
        )
    env = read_env()
    if env.world_size > 1 and strategy not in GROUP_STRATEGIES:
        raise LaunchError(
            f"{env.world_size} processes were launched with strategy {strategy!r}, so each would train alone "
            f"on all the data: use --strategy ddp (or start one process: python train.py --strategy {strategy})"
        )
    device, backend = plan_device(env, strategy, backend, cuda_count=_visible_gpus(env))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend is not None:
        _init_group(env, backend, device, timeout_s)
        try:
            check_world(_gather_rows(env, strategy, device))
        except BaseException:
            teardown()
            raise
    info = DistInfo(
        rank=env.rank, local_rank=env.local_rank, world_size=env.world_size,
        local_world_size=env.local_world_size, node_rank=env.node_rank, device=device, backend=backend,
        launcher=env.launcher, strategy=strategy,
    )
    _log.info("launcher=%s strategy=%s rank=%d/%d node=%d local=%d/%d device=%s backend=%s",
              info.launcher, strategy, info.rank, info.world_size, info.node_rank, info.local_rank,
              info.local_world_size, device, backend)
    return info


def teardown() -> None:
    """Destroy the process group if :func:`setup` created it. Safe to call any number of times."""
    if _Owned.group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _Owned.group = False
    _Owned.store = None


@contextmanager
def distributed(strategy: str = "single", **kw) -> Iterator[DistInfo]:
    """``with distributed("ddp") as info:`` — :func:`setup` on entry, :func:`teardown` on any exit.

    Keyword arguments go to :func:`setup`.
    """
    try:
        yield setup(strategy, **kw)
    finally:
        teardown()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over all ranks, returning a new tensor on ``t``'s device; ``t`` itself is untouched.

    Without a process group (``info.distributed`` is false) it returns a copy. With ``nccl`` the copy is
    reduced on ``info.device`` and moved back, so CPU tensors work with either backend.

    Example:
        >>> correct = all_reduce_sum(torch.tensor([hits, seen]), info)  # same on every rank
    """
    out = t.detach().clone()
    if not info.distributed:
        return out
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("all_reduce_sum() after teardown(): reduce inside the `with distributed(...)` block")
    work = out.to(info.device) if info.backend == "nccl" else out
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(t.device)


def plan_device(env: LaunchEnv, strategy: str, backend: str | None, *,
                cuda_count: int) -> tuple[torch.device, str | None]:
    """Pick this process's device and process-group backend (``None``: no group). Pure; see :func:`setup`.

    Raises:
        LaunchError: more processes on this node than ``cuda_count`` GPUs, or ``nccl`` without CUDA.
    """
    if cuda_count > 0 and strategy == "dp":
        device = torch.device("cuda", 0)  # DataParallel scatters from cuda:0 to every visible GPU
    elif cuda_count > 0:
        if env.local_world_size > cuda_count:
            raise LaunchError(
                f"{env.local_world_size} processes on this node but {cuda_count} visible GPU(s), so GPUs would "
                f"be shared: launch --nproc_per_node={cuda_count} (or fewer), or set CUDA_VISIBLE_DEVICES"
            )
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    if strategy not in GROUP_STRATEGIES:
        return device, None
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise LaunchError("backend 'nccl' needs CUDA but this process runs on CPU: use backend='gloo'")
    return device, backend


def check_world(rows: Sequence[Sequence[int]]) -> None:
    """Check the rows every rank reported: ``(rank, world_size, local_rank, local_world_size, node_rank,
    strategy_crc)``, indexed by process-group rank.

    Raises:
        LaunchError: ranks not unique, disagreement on the world size or strategy, or a node whose
            process count and local ranks do not match its LOCAL_WORLD_SIZE.
    """
    n = len(rows)
    ranks = [r[0] for r in rows]
    if ranks != list(range(n)):
        raise LaunchError(
            f"ranks {ranks} are not 0..{n - 1} once each, so processes collide: launch all of them with one "
            "torchrun/srun command per node and do not export RANK by hand"
        )
    worlds = sorted({r[1] for r in rows})
    if worlds != [n]:
        raise LaunchError(
            f"ranks disagree on WORLD_SIZE ({worlds}, group has {n}): start every node with the same "
            "--nnodes and --nproc_per_node"
        )
    if len({r[5] for r in rows}) > 1:
        raise LaunchError("ranks were started with different --strategy values: pass the same one to all")
    nodes: dict[int, list[Sequence[int]]] = {}
    for r in rows:
        nodes.setdefault(r[4], []).append(r)
    for node, members in sorted(nodes.items()):
        sizes = sorted({m[3] for m in members})
        locals_ = sorted(m[2] for m in members)
        if sizes != [len(members)] or locals_ != list(range(len(members))):
            raise LaunchError(
                f"node {node} has {len(members)} process(es) with local ranks {locals_} but reports "
                f"LOCAL_WORLD_SIZE {sizes}: give each node its own --node_rank and the same --nproc_per_node"
            )


def _visible_gpus(env: LaunchEnv) -> int:
    if env.use_cpu or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


def _init_group(env: LaunchEnv, backend: str, device: torch.device, timeout_s: float) -> None:
    timeout = timedelta(seconds=timeout_s)
    kw: dict = dict(backend=backend, timeout=timeout, rank=env.rank, world_size=env.world_size)
    if backend == "nccl":
        kw["device_id"] = device
    where = f"{env.master_addr}:{env.master_port}"
    try:
        if env.master_addr and env.master_port:
            # env:// reads MASTER_ADDR/MASTER_PORT from os.environ, the same mapping read_env() parsed; it
            # also joins torchrun's agent store instead of starting a second server on that port.
            dist.init_process_group(init_method="env://", **kw)
        else:
            # One process and no rendezvous address: host a private store on a port the OS picks (port 0),
            # so there is no race for a "free" port and nothing listens beyond 127.0.0.1.
            store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)
            where = f"127.0.0.1:{store.port}"
            dist.init_process_group(store=store, **kw)
            _Owned.store = store
    except Exception as e:
        if dist.is_initialized():
            dist.destroy_process_group()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LaunchError(
            f"rank {env.rank} of {env.world_size} could not form the process group at {where} within "
            f"{timeout_s:g}s ({type(e).__name__}: {first}): start all {env.world_size} processes "
            "(torchrun --nnodes/--nproc_per_node, or srun) and make MASTER_ADDR:MASTER_PORT reachable"
        ) from e
    _Owned.group = True


def _gather_rows(env: LaunchEnv, strategy: str, device: torch.device) -> list[list[int]]:
    # zlib.crc32, not hash(): str hashes are salted per process (PYTHONHASHSEED).
    row = torch.tensor([env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank,
                        zlib.crc32(strategy.encode())], dtype=torch.int64, device=device)
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    return [r.tolist() for r in rows]
