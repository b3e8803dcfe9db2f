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

import atexit
import logging
import os
import re
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from . import preflight, slurm
from .env import LaunchEnv, read_env
from .errors import LaunchError

STRATEGIES = ("single", "dp", "ddp", "fsdp")
GROUP_STRATEGIES = ("ddp", "fsdp")  # strategies that run one process per device in a process group

_log = logging.getLogger("anytopo.launcher")

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_VAR = "ANYTOPO_DIST_TIMEOUT"
"""Process-group timeout in seconds when setup() is given none; anytopo-launch sets it to --join-timeout."""

# gloo's text when a peer advertised an address nobody else can reach: "... Connection refused, remote=[127.0.0.1]:N"
_REFUSED_LOOPBACK = re.compile(r"Connection refused, remote=\[(127\.[0-9.]+|::1)\]")


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
    restart: int = 0
    """How many times the launcher restarted this job's workers, agreed by every rank: the largest of the
    ranks' ``TORCHELASTIC_RESTART_COUNT`` and of the rounds the rendezvous store has seen. Agents of several
    nodes count differently (a node whose workers were healthy restarts for a new round without counting
    it), so one rank's own count can be 0 in a restarted job; this value is not."""

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
    gloo_used = False  # a gloo group existed in this process: exit_process() skips interpreter finalization
    rounds = 0  # rounds this attempt's rendezvous store saw before it (see _agree_attempt)
    attempt = 0  # this launch attempt's key prefix number in the rendezvous store (see _attempt_store)


def setup(strategy: str = "single", *, backend: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Set up this process for ``strategy`` from the launch environment.

    Call it once, at the start of ``main()``, before anything else that touches ``torch.distributed``
    (``Accelerator()`` included), and pair it with :func:`teardown` — or use :func:`distributed`.

    Args:
        strategy: ``"single"`` (one process, one device), ``"dp"`` (one process, ``nn.DataParallel`` over
            the visible GPUs) or ``"ddp"`` (one process per device, ``DistributedDataParallel``). ``ddp``
            also runs as a plain ``python train.py``: it then makes a process group of one.
        backend: override the process-group backend (default: ``nccl`` on CUDA, ``gloo`` on CPU).
        timeout_s: how long to wait for the other ranks at start-up and in collectives; ``None``: the
            ``ANYTOPO_DIST_TIMEOUT`` variable (``anytopo-launch`` sets it to its ``--join-timeout``), else 300.

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
    if env.launcher == "slurm" and env.master_addr and not os.environ.get("MASTER_ADDR"):
        # derived from the job (launcher.slurm): torch's env:// store reads the variables themselves
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = env.master_addr, str(env.master_port)
    if env.launcher == "slurm" and env.num_nodes > 1 and not any(os.environ.get(v) for v in preflight.IFNAME_VARS):
        # srun started the ranks (no torchrun, no anytopo-launch): gloo/NCCL would advertise the address of
        # this host's name, which may resolve nowhere or to loopback; pin them to the route to rank 0
        iface = preflight.route_interface(preflight.resolve(env.master_addr, env.master_port))
        if iface:
            for var in preflight.IFNAME_VARS:
                os.environ[var] = iface
    # a requeued Slurm job (SLURM_RESTART_COUNT) is a restart like torchrun's: it resumes its own latest entry
    restart = max(restart_attempt(), slurm.restart_count(os.environ))
    if backend is not None:
        _Owned.rounds = 0
        _init_group(env, backend, device, resolve_timeout(timeout_s))
        try:
            rows = _gather_rows(env, strategy, device, max(restart, _Owned.rounds))
            check_world(rows)
        except BaseException:
            teardown()
            raise
        restart = max(r[6] for r in rows)
    info = DistInfo(
        rank=env.rank, local_rank=env.local_rank, world_size=env.world_size,
        local_world_size=env.local_world_size, node_rank=env.node_rank, device=device, backend=backend,
        launcher=env.launcher, strategy=strategy, restart=restart,
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

    Keyword arguments go to :func:`setup`. On a normal exit every rank meets at a barrier first, so no rank
    tears down while a peer still sends to it. After an exception there is no barrier, so a rank whose peer
    crashed does not wait on it. End the process with :func:`exit_process` (scripts: :func:`run_main`).
    """
    try:
        info = setup(strategy, **kw)
        yield info
    except BaseException:
        teardown()
        raise
    try:
        if _Owned.group and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        teardown()


def exit_process(code: int | None = 0, *, skip_finalization: bool | None = None) -> NoReturn:
    """End this process with ``code``, like ``sys.exit``; after gloo, without interpreter finalization.

    gloo's worker threads outlive ``destroy_process_group`` and release each finished collective on their own
    thread. When that collective held tensors whose Python objects were freed meanwhile (DDP's buffer
    broadcast, a temporary flag tensor), releasing them needs the GIL; a thread that asks for the GIL while the
    interpreter finalizes is ended by Python, and ending a C++ thread that way std::terminate()s the whole
    process: SIGABRT, "terminate called without an active exception", exit -6, after every byte of work
    succeeded. A core dump shows exactly that stack (ProcessGroupGloo::runLoop -> ~AsyncBarrierWork ->
    ~AsyncBroadcastWork -> ~TensorImpl -> gil_scoped_acquire -> PyThread_exit_thread). It struck about 1 run in
    10 of a two-rank DDP test worker on 2 loaded cores; no barrier or sleep closes the race, because nothing
    in Python can wait for gloo's threads. So once a gloo group has existed (``skip_finalization=None``), this
    does what a normal exit does while the interpreter is still whole -- waits for non-daemon threads (a
    background checkpoint write among them), runs ``atexit`` handlers, flushes logging and stdio -- and then
    ends the process with ``os._exit(code)`` instead of finalizing it.
    """
    if isinstance(code, bool) or not isinstance(code, int):
        code = 0 if code is None else 1
    if skip_finalization is None:
        skip_finalization = _Owned.gloo_used
    if not skip_finalization:
        sys.exit(code)
    try:
        # what Py_FinalizeEx does first: join non-daemon threads (and run threading's own exit hooks, which
        # stop idle ThreadPoolExecutor workers), then atexit handlers
        getattr(threading, "_shutdown", lambda: None)()
        atexit._run_exitfuncs()
    except BaseException:  # an exit hook failed: say so, and still end with the code main gave
        sys.excepthook(*sys.exc_info())
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to flush into
            pass
    os._exit(code)


def run_main(main: Callable[[], int | None], *, skip_finalization: bool | None = None) -> NoReturn:
    """Run a script's ``main`` and end the process with its exit code through :func:`exit_process`.

    An uncaught exception prints its traceback as the interpreter would and exits 1; ``SystemExit`` keeps its
    code; Ctrl-C exits 130. Scripts end with ``if __name__ == "__main__": launcher.run_main(main)``.
    """
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) or e.code is None else 1
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    exit_process(code, skip_finalization=skip_finalization)


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


def resolve_timeout(timeout_s: float | None, environ: dict[str, str] | None = None) -> float:
    """``timeout_s``, else ``$ANYTOPO_DIST_TIMEOUT``, else 300 s.

    Raises:
        LaunchError: the value is not a positive number.
    """
    if timeout_s is None:
        raw = (os.environ if environ is None else environ).get(TIMEOUT_VAR, "").strip()
        try:
            timeout_s = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise LaunchError(f"{TIMEOUT_VAR}={raw!r} is not a number of seconds: unset it or pass e.g. 120") from None
    if not timeout_s > 0:
        raise LaunchError(f"process-group timeout {timeout_s:g}s must be > 0: pass --dist-timeout SECONDS")
    return timeout_s


def explain_init_failure(env: LaunchEnv, where: str, elapsed: float, timeout_s: float, err: BaseException) -> str:
    """The one-line LaunchError text when ``init_process_group`` failed after ``elapsed`` seconds."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    head = (f"rank {env.rank} of {env.world_size} could not form the process group at {where} after "
            f"{elapsed:.0f}s (timeout {timeout_s:g}s; {type(err).__name__}: {first})")
    loop = _REFUSED_LOOPBACK.search(str(err))
    master_is_loopback = (env.master_addr or "127.0.0.1").startswith(("127.", "localhost")) or env.master_addr == "::1"
    if loop and not master_is_loopback:
        return (f"{head}: a peer advertised the loopback address {loop.group(1)} because its host name resolves to "
                "loopback; set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME for nccl) to the interface of the network "
                "between the nodes, on every node (anytopo-launch --ifname IFACE|auto does it)")
    return (f"{head}: start all {env.world_size} processes (torchrun --nnodes/--nproc_per_node, or srun), make "
            "MASTER_ADDR:MASTER_PORT reachable from every node, and if a host name resolves to loopback set "
            "GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME (anytopo-launch --ifname)")


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
    start = time.monotonic()
    watch, serving = None, None
    try:
        if env.master_addr and env.master_port:
            store, attempt, serving = _attempt_store(env, timeout)
            _Owned.attempt = attempt
            watch = _PeerWatch(env, attempt) if env.world_size > 1 else None
            dist.init_process_group(store=store, **kw)
        else:
            # One process and no rendezvous address: host a private store on a port the OS picks (port 0),
            # so there is no race for a "free" port and nothing listens beyond 127.0.0.1.
            store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)
            where = f"127.0.0.1:{store.port}"
            dist.init_process_group(store=store, **kw)
            _Owned.store = store
        _Owned.gloo_used = _Owned.gloo_used or "gloo" in backend
    except Exception as e:
        if dist.is_initialized():
            dist.destroy_process_group()
        msg = explain_init_failure(env, where, time.monotonic() - start, timeout_s, e)
        if watch is not None:
            watch.report(msg)
        raise LaunchError(msg) from e
    finally:
        if watch is not None:
            watch.stop()
        if serving is not None:
            serving.set()  # every rank joined (or this one failed): no follower waits for its attempt any more
    _Owned.group = True


def open_store(namespace: str, timeout_s: float = 5.0) -> dist.Store | None:
    """A new client connection to the run's rendezvous store (MASTER_ADDR:MASTER_PORT: torchrun's agent store,
    or the one rank 0 hosts), seen through this launch attempt's key prefix and ``namespace``, for a component
    that talks to its peers outside collectives (``launcher.watchdog``). Its own connection: a TCPStore client
    serves one request at a time. ``None`` without a process group formed from a rendezvous address (one
    process, no launcher). Every call of it may raise once the store is gone (``DistStoreError``)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (_Owned.group and addr and port and port.isdigit()):
        return None
    store = dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    return dist.PrefixStore(f"anytopo/attempt-{_Owned.attempt}/{namespace}/", store)


def restart_attempt(environ: Mapping[str, str] | None = None) -> int:
    """How many times torchrun has restarted this worker group: ``TORCHELASTIC_RESTART_COUNT`` (0 when
    unset, i.e. a first launch or another launcher)."""
    value = (os.environ if environ is None else environ).get("TORCHELASTIC_RESTART_COUNT", "0")
    try:
        return max(0, int(value))
    except ValueError:
        raise LaunchError(f"TORCHELASTIC_RESTART_COUNT={value!r} is not an integer: launch with torchrun, "
                          "or unset it") from None


def _attempt_store(env: LaunchEnv, timeout: timedelta) -> tuple[dist.Store, int, threading.Event | None]:
    """The rendezvous store of this launch attempt, its attempt number, and (on rank 0 under a shared agent
    store) the event that ends the thread telling the other ranks that number.

    The store is MASTER_ADDR:MASTER_PORT seen through the key prefix ``anytopo/attempt-N/``. Why: torchrun's
    agent keeps ONE store server for the whole job (TCPStore sharing, the default since torch 2.5) and
    restarts workers into it. ``init_process_group("env://")`` would use the same keys
    (``default_pg/0//cpu/rank_K``) in every attempt, so a restarted rank can read the address the dead
    attempt's rank K published and gloo fails with ``connectFullMesh ... Connection refused``, or waits on a
    port that nobody serves any more. Keys prefixed per attempt are only ever written by live processes.
    N is agreed through the store (:func:`_agree_attempt`), not taken from ``TORCHELASTIC_RESTART_COUNT``:
    the agents of several nodes count restarts differently.
    """
    # env:// reads MASTER_ADDR/MASTER_PORT from os.environ, the same mapping read_env() parsed; under torchrun
    # it connects to the agent's store as a client instead of starting a second server on that port.
    store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
    store.set_timeout(timeout)
    attempt, serving = _agree_attempt(store, env, timeout)
    return dist.PrefixStore(f"anytopo/attempt-{attempt}/", store), attempt, serving


_GENERATION = "anytopo/generation"  # attempts that used this store: rank 0 of each adds 1
_HELLO = "anytopo/hello"  # append-only: each non-zero rank's fresh token, ';'-terminated
_REPLY = "anytopo/generation-of/"  # + token: the attempt number rank 0 gave that token
_POLL_S = 0.005


def _agree_attempt(store: dist.Store, env: LaunchEnv, timeout: timedelta) -> tuple[int, threading.Event | None]:
    """One attempt number for every rank of this launch, never used by an earlier attempt on this store.

    Only a store shared by all attempts needs one (torchrun's agent store, ``TORCHELASTIC_USE_AGENT_STORE``
    ``True``); any other store is fresh (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, srun, a hand-set environment): 0.

    ``TORCHELASTIC_RESTART_COUNT`` cannot be it: each node's agent counts, and a node whose workers were
    healthy joins the next round without counting (``api.py:_invoke_run``, "membership changes do not count
    as retries"), so ranks of one attempt would wait under different prefixes, or meet a dead attempt's keys.
    Instead rank 0 takes the next number from an atomic counter in the store; every other rank appends a
    token nobody used before to one key and waits for rank 0's reply under that token. A reply can only come
    from this attempt's rank 0 (an earlier rank 0 never saw the token), and torchrun stops every worker of an
    attempt before the next round forms, so no earlier rank 0 is still answering. Rank 0 answers every token
    it sees (also stale ones of a dead attempt: harmless) until the process group is formed, which needs
    every rank, so none is left waiting.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return 0, None
    if env.rank == 0:
        attempt = store.add(_GENERATION, 1)
        _Owned.rounds = attempt - 1
        if env.world_size == 1:
            return attempt, None
        done = threading.Event()
        # its own connection: a TCPStore client runs one request at a time, and the main thread's is about to
        # block in init_process_group's wait for the other ranks' keys
        client = dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=timeout)
        threading.Thread(target=_answer_tokens, args=(client, attempt, done), name="anytopo-attempt",
                         daemon=True).start()
        return attempt, done
    token = uuid.uuid4().hex
    store.append(_HELLO, token + ";")
    store.wait([_REPLY + token], timeout)
    attempt = int(store.get(_REPLY + token))
    _Owned.rounds = attempt - 1
    return attempt, None


def _answer_tokens(store: dist.Store, attempt: int, done: threading.Event) -> None:
    answered: set[str] = set()
    while not done.is_set():
        try:
            tokens = store.get(_HELLO).decode().split(";") if store.check([_HELLO]) else []
            for token in tokens:
                if token and token not in answered:
                    store.set(_REPLY + token, str(attempt))
                    answered.add(token)
        except Exception:  # the store went away: init_process_group reports it
            return
        done.wait(_POLL_S)


class _PeerWatch:
    """While ``init_process_group`` blocks, stop this rank as soon as a peer reports that it failed to join.

    gloo's full-mesh connect does not notice a peer that died: it waits several times the timeout (measured:
    100 s for a 20 s timeout). A rank whose init fails writes its error under one key of the rendezvous store
    (:meth:`report`); every other rank polls that key from a thread, and so does not hang. If the store itself
    goes away (the master's agent exited after its ranks failed), that is reported the same way.
    """

    POLL_S = 1.0

    def __init__(self, env: LaunchEnv, attempt: int = 0):
        self.key = f"anytopo/init_failed/{attempt}"  # per attempt: a failed attempt cannot stop the next
        self.env = env
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="anytopo-peer-watch", daemon=True)
        self._thread.start()

    def _client(self) -> dist.TCPStore | None:
        try:
            # 1 s: a client's connect gives up after ~2.5x this when nothing listens
            return dist.TCPStore(self.env.master_addr, self.env.master_port, is_master=False,
                                 timeout=timedelta(seconds=1), wait_for_workers=False)
        except Exception:
            return None

    def _watch(self) -> None:
        store, lost, reached = None, 0, False
        while not self._stop.wait(self.POLL_S):
            try:
                store = store or self._client()
                if store is None:
                    raise ConnectionError
                reached = True  # a store that was never reached is not yet up (its host starts later), not gone
                if store.check([self.key]):
                    why = store.get(self.key).decode(errors="replace")
                    self._exit(f"another rank failed to join the process group, so this one stops instead of "
                               f"waiting out the timeout; its error: {why}")
                lost = 0
            except ConnectionError:
                lost += 1
            except Exception:
                store, lost = None, lost + 1
            if reached and lost >= 3 and store is None and not self._stop.is_set():
                self._exit(f"the rendezvous store at {self.env.master_addr}:{self.env.master_port} went away while "
                           "this rank waited for its peers (the master node's launcher exited: see its log for why)")

    def _exit(self, msg: str) -> None:
        if self._stop.is_set():
            return
        print(f"error: rank {self.env.rank} of {self.env.world_size}: {msg}", file=sys.stderr, flush=True)
        os._exit(LaunchError.exit_code)  # the main thread is inside gloo's C++ connect: no other way out

    def report(self, msg: str) -> None:
        """Tell the other ranks that this one failed (best effort: the store may be what failed)."""
        self.stop()
        store = self._client()
        if store is not None:
            try:
                store.set(self.key, msg)
                # the store may live in this node's agent, which exits once this process has: give the peers'
                # watchers (polling every POLL_S) the time to read the key first
                time.sleep(2 * self.POLL_S)
            except Exception:
                pass

    def stop(self) -> None:
        """End the watch and wait for its thread (at most one store connect, ~2.5 s when nothing listens): a
        thread left inside TCPStore's C++ while the interpreter finalizes aborts the process at exit."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


def _gather_rows(env: LaunchEnv, strategy: str, device: torch.device, restart: int = 0) -> list[list[int]]:
    """Every rank's ``(rank, world_size, local_rank, local_world_size, node_rank, strategy_crc, restart)``."""
    # zlib.crc32, not hash(): str hashes are salted per process (PYTHONHASHSEED).
    row = torch.tensor([env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank,
                        zlib.crc32(strategy.encode()), restart], dtype=torch.int64, device=device)
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    return [r.tolist() for r in rows]
