"""``anytopo-launch`` / ``python -m launcher``: plan, check and start a run on one node or N.

It builds the real ``torchrun`` (or ``accelerate launch``) command for this node, prints it, runs the
pre-flight checks of :mod:`launcher.preflight` and replaces itself with that command (``os.execvpe``): torch's
elastic agent manages the processes, nothing here does. ``--dry-run`` prints every node's command;
``--slurm`` prints an sbatch script that runs this launcher once per node. The torchrun engine runs as
``python -m launcher.torchrun``, which is torchrun with one change: a rendezvous that times out ends in one
line saying how many nodes joined and where (see :mod:`launcher.torchrun`).

Every wait is bounded by ``--join-timeout`` (default 120 s): the rendezvous (``--rdzv-conf
join_timeout=S,timeout=S``: c10d reads the first, the static store the second) and the script's process
group (``ANYTOPO_DIST_TIMEOUT``, which :func:`launcher.setup` reads when the script passes no timeout).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, field

from . import preflight, slurm
from .errors import LaunchError
from .watchdog import HUNG_EXIT_CODE

ENGINES = ("torchrun", "accelerate")
RDZV = ("static", "c10d")
DEFAULT_PORT = 29500
DIST_TIMEOUT_VAR = "ANYTOPO_DIST_TIMEOUT"
_TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
CLIENT_SHARE = 0.4
"""A rendezvous client's store timeout, as a share of --join-timeout (see :func:`node_command`)."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anytopo-launch", description="Plan, check and start a run on one node or N (torchrun/accelerate).",
        epilog="example, on each of 2 nodes: anytopo-launch --nnodes 2 --nproc-per-node 8 --node-rank R "
               "--master node01:29500 scripts/train.py --strategy ddp ...")
    p.add_argument("--nnodes", default=None, metavar="N[:M]",
                   help="nodes; a range N:M is elastic (c10d only). Default: 1, or under srun the step's nodes")
    p.add_argument("--nproc-per-node", default="auto", metavar="K|auto",
                   help="processes per node (auto: the visible GPUs, or 1 on CPU)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this node's rank under static rendezvous (default: $SLURM_NODEID); 0 is the master")
    p.add_argument("--master", default=None, metavar="HOST:PORT",
                   help="rendezvous address on the master node (default: $MASTER_ADDR:$MASTER_PORT, or under srun "
                        "the step's first node, by name or by its Slurm NodeAddr, and a port from the job id)")
    p.add_argument("--rdzv", choices=RDZV, default="static",
                   help="static: fixed nodes, node rank 0 is rank 0; c10d: elastic, ranks in order of joining")
    p.add_argument("--rdzv-id", default=None, help="c10d run id, the same on every node (default: from the master)")
    p.add_argument("--engine", choices=ENGINES, default="torchrun")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts of the worker group")
    p.add_argument("--join-timeout", type=float, default=120.0, metavar="S",
                   help="the longest any node waits for the others, at rendezvous and process-group start")
    p.add_argument("--node-loss-timeout", type=float, default=9.0, metavar="S",
                   help="c10d: a node silent this long (its agent died) is dropped from the next rendezvous round "
                        "(torch's default 15 s); heartbeats every S/3 s")
    p.add_argument("--last-call", type=float, default=10.0, metavar="S",
                   help="elastic c10d (--nnodes N:M): once N nodes joined, wait this long for more before the "
                        "round closes (torch's default 30 s); a node that comes later joins at the next restart")
    p.add_argument("--ifname", default=None, metavar="IFACE|auto",
                   help="pin gloo/NCCL to this interface (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME); auto: the "
                        "interface that routes to the master (the default for several nodes under srun)")
    p.add_argument("--forward-signal", action="append", default=[], metavar="SIG",
                   help="also forward this signal from torchrun to the workers (e.g. SIGUSR1 for SLURM --signal)")
    p.add_argument("--dry-run", action="store_true", help="print every node's command and exit")
    p.add_argument("--slurm", action="store_true", help="print an sbatch script for this run and exit")
    p.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    p.add_argument("script", help="the training script, e.g. scripts/train.py")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    return p


@dataclass(kw_only=True, frozen=True)
class LaunchConfig:
    """One launch, validated: the same on every node except ``node_rank``."""

    script: str
    script_args: tuple[str, ...] = ()
    nnodes_min: int = 1
    nnodes_max: int = 1
    nproc_per_node: int = 1
    node_rank: int | None = None
    """This node's rank (static); ``None`` under c10d or when only planning."""
    node_rank_given: bool = False
    master_host: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    master_given: bool = False
    rdzv: str = "static"
    rdzv_id: str | None = None
    engine: str = "torchrun"
    max_restarts: int = 0
    join_timeout: float = 120.0
    node_loss_timeout: float = 9.0
    """c10d: seconds without a heartbeat after which a node is dropped (keep_alive_interval x 3 attempts)."""
    last_call: float = 10.0
    """Elastic c10d: seconds the round stays open for more nodes once the minimum joined."""
    ifname: str | None = None
    forward_signals: tuple[str, ...] = ()
    gpus: int = 0
    """Visible GPUs on this node (0: CPU, gloo)."""

    def __post_init__(self) -> None:
        if self.nnodes_min < 1 or self.nnodes_max < self.nnodes_min:
            raise LaunchError(f"--nnodes {self.nnodes_min}:{self.nnodes_max} is not a range of at least one node: "
                              "use N or N:M with 1 <= N <= M")
        if self.nnodes_min != self.nnodes_max and self.rdzv == "static":
            raise LaunchError(f"--nnodes {self.nnodes_min}:{self.nnodes_max} is elastic, which the static "
                              "rendezvous cannot do: add --rdzv c10d, or give one node count")
        if self.nnodes_min != self.nnodes_max and self.engine == "accelerate":
            raise LaunchError("accelerate launch takes a fixed --num_machines: give one node count, or use "
                              "--engine torchrun --rdzv c10d")
        if self.nproc_per_node < 1:
            raise LaunchError(f"--nproc-per-node {self.nproc_per_node} must be >= 1 (or auto)")
        if self.join_timeout <= 0:
            raise LaunchError(f"--join-timeout {self.join_timeout:g} must be > 0 seconds")
        if self.node_loss_timeout < 3:
            raise LaunchError(f"--node-loss-timeout {self.node_loss_timeout:g} must be >= 3 seconds (heartbeats go "
                              "every S/3 s, in whole seconds)")
        if self.last_call < 1:
            raise LaunchError(f"--last-call {self.last_call:g} must be >= 1 second")
        if self.max_restarts < 0:
            raise LaunchError(f"--max-restarts {self.max_restarts} must be >= 0")
        if not 0 < self.master_port < 65536:
            raise LaunchError(f"master port {self.master_port} is outside 1..65535: pass --master HOST:PORT")

    @property
    def multinode(self) -> bool:
        return self.nnodes_max > 1

    @property
    def join_s(self) -> int:
        return max(1, round(self.join_timeout))

    @property
    def master(self) -> str:
        return f"{self.master_host}:{self.master_port}"

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: dict[str, str] | os._Environ = os.environ, *,
                  gpus: int, need_master: bool = True) -> "LaunchConfig":
        in_step = slurm.in_step(env)  # a task of srun: the job says what the flags do not
        nnodes = args.nnodes if args.nnodes is not None else str(slurm.num_nodes(env) or 1) if in_step else "1"
        nmin, nmax = _parse_nnodes(nnodes)
        nproc = _parse_nproc(args.nproc_per_node, gpus)
        master = args.master
        if master is None and env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
            master = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        if master is None and nmax > 1 and in_step and need_master:
            master = "{}:{}".format(*slurm.master(env))
        if master is None and nmax > 1 and need_master:
            raise LaunchError(f"--nnodes {nnodes} needs the master's address: pass --master HOST:PORT (the "
                              "same on every node; HOST is the node with --node-rank 0)")
        host, port = _parse_master(master) if master else ("127.0.0.1", DEFAULT_PORT)
        if master and slurm.in_job(env) and nmax > 1 and need_master:
            host = slurm.node_address(host, env)  # a node name that does not resolve: Slurm's NodeAddr for it
        ifname = args.ifname
        if ifname is None and in_step and nmax > 1 and not any(env.get(v) for v in preflight.IFNAME_VARS):
            ifname = "auto"  # node names may resolve nowhere (or to loopback): pin gloo to the route to rank 0
        node_rank = args.node_rank
        if node_rank is None and args.rdzv == "static":
            if nmax > 1 and env.get("SLURM_NODEID", "").isdigit():
                node_rank = int(env["SLURM_NODEID"])
            elif nmax == 1:
                node_rank = 0
        return cls(script=args.script, script_args=tuple(args.script_args), nnodes_min=nmin, nnodes_max=nmax,
                   nproc_per_node=nproc, node_rank=node_rank, node_rank_given=args.node_rank is not None,
                   master_host=host, master_port=port, master_given=master is not None, rdzv=args.rdzv,
                   rdzv_id=args.rdzv_id, engine=args.engine, max_restarts=args.max_restarts,
                   join_timeout=args.join_timeout, node_loss_timeout=args.node_loss_timeout,
                   last_call=args.last_call, ifname=ifname,
                   forward_signals=tuple(_signal_name(s) for s in args.forward_signal), gpus=gpus)


@dataclass(frozen=True)
class NodeCommand:
    """What to run on one node: extra environment and the argument vector."""

    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)

    def shell(self) -> str:
        """The command as one shell line, environment first."""
        assigns = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join(assigns + [shlex.quote(a) for a in self.argv])


def node_command(cfg: LaunchConfig, node_rank: int | None, *, ifname: str | None = None,
                 hosts_store: bool | None = None, local_addr: str | None = None,
                 base_env: dict[str, str] | os._Environ = os.environ) -> NodeCommand:
    """The command for node ``node_rank`` (``None`` under c10d, where the rendezvous assigns it).

    ``hosts_store`` (c10d): whether this node serves the rendezvous store; ``None`` leaves it to torch, which
    decides by matching the endpoint against the addresses *this host's name* resolves to, and so gets it
    wrong exactly when that name resolves to loopback. ``local_addr`` (torchrun, c10d): the address this node
    gives the others for the store of its workers' process group, when rendezvous makes it rank 0; without it
    torch advertises this host's name (``localhost`` in that same case).
    """
    env: dict[str, str] = {}
    if "OMP_NUM_THREADS" not in base_env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.nproc_per_node))
    if ifname:
        for var in preflight.IFNAME_VARS:
            env[var] = ifname
    env[DIST_TIMEOUT_VAR] = str(cfg.join_s)
    # A client's first connect to the rendezvous store retries once after a back-off: measured, it gives up
    # after ~2.3x its store timeout. Clients get 0.4x --join-timeout so that they, too, report within it;
    # the store's server (static node 0) waits --join-timeout for the clients.
    client_s = max(1, round(CLIENT_SHARE * cfg.join_s))
    store_s = cfg.join_s if cfg.rdzv == "c10d" or node_rank == 0 else client_s
    conf = f"join_timeout={cfg.join_s},timeout={store_s}"
    if cfg.rdzv == "c10d":
        conf += f",read_timeout={client_s}"
        # torch's defaults (a dead node dropped after 3 x 5 s; a round kept open 30 s for more nodes) add ~45 s
        # to every restart that follows a lost node; heartbeats are whole seconds (get_as_int)
        conf += f",keep_alive_interval={max(1, int(cfg.node_loss_timeout // 3))},keep_alive_max_attempt=3"
        if cfg.nnodes_min != cfg.nnodes_max:
            conf += f",last_call_timeout={max(1, round(cfg.last_call))}"
    if cfg.rdzv == "c10d" and hosts_store is not None:
        conf += f",is_host={int(hosts_store)}"
    if cfg.engine == "accelerate":
        if cfg.gpus == 0:
            env["ACCELERATE_USE_CPU"] = "1"
        argv = [_venv_tool("accelerate"), "launch"]
        if cfg.nnodes_max * cfg.nproc_per_node > 1:
            argv.append("--multi_gpu")  # with ACCELERATE_USE_CPU=1 too: it is what starts N processes
        argv += ["--num_machines", str(cfg.nnodes_max), "--num_processes", str(cfg.nnodes_max * cfg.nproc_per_node),
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--max_restarts", str(cfg.max_restarts)]
        if cfg.multinode:
            argv += ["--machine_rank", str(node_rank), "--main_process_ip", cfg.master_host,
                     "--main_process_port", str(cfg.master_port), "--rdzv_backend", cfg.rdzv, "--rdzv_conf", conf]
        elif cfg.master_given:
            argv += ["--main_process_port", str(cfg.master_port)]
        return NodeCommand(env, argv + [cfg.script, *cfg.script_args])
    argv = [sys.executable, "-m", "launcher.torchrun"]
    nnodes = str(cfg.nnodes_max) if cfg.nnodes_min == cfg.nnodes_max else f"{cfg.nnodes_min}:{cfg.nnodes_max}"
    argv += [f"--nnodes={nnodes}", f"--nproc-per-node={cfg.nproc_per_node}"]
    if not cfg.multinode and not cfg.master_given:
        # c10d on a free localhost port: nothing to collide with; the workers reach it at 127.0.0.1, not at this
        # host's name (a Slurm node's name may resolve nowhere: torch then retries the lookup for minutes)
        argv += ["--standalone", "--local-addr=127.0.0.1"]
    elif cfg.rdzv == "static":
        argv += [f"--node-rank={node_rank}", f"--master-addr={cfg.master_host}", f"--master-port={cfg.master_port}"]
    else:
        argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.master}",
                 f"--rdzv-id={cfg.rdzv_id or 'anytopo-' + cfg.master.replace(':', '-')}"]
        if local_addr:
            argv.append(f"--local-addr={local_addr}")
    argv += [f"--rdzv-conf={conf}", f"--max-restarts={cfg.max_restarts}"]
    if cfg.forward_signals:
        signals = _TORCHRUN_SIGNALS.split(",") + [s for s in cfg.forward_signals if s not in _TORCHRUN_SIGNALS]
        argv.append(f"--signals-to-handle={','.join(signals)}")
    return NodeCommand(env, argv + [cfg.script, *cfg.script_args])


def plan(cfg: LaunchConfig) -> list[tuple[str, NodeCommand]]:
    """``(which nodes, command)`` for every node of the run: one per rank (static), one for all (c10d)."""
    ifname = None if cfg.ifname == "auto" else cfg.ifname
    if cfg.rdzv == "c10d" and cfg.engine == "torchrun":
        nodes = f"{cfg.nnodes_min}..{cfg.nnodes_max} nodes; ranks go in order of joining"
        if not cfg.multinode or _loopback(cfg.master_host):
            return [(f"every node ({nodes})", node_command(cfg, None, ifname=ifname))]
        if ifname:
            nodes += f"; at start anytopo-launch adds --local-addr=<the node's {ifname} address>"
        return [(f"the node at {cfg.master_host} (serves the c10d store; {nodes})",
                 node_command(cfg, None, ifname=ifname, hosts_store=True)),
                ("every other node", node_command(cfg, None, ifname=ifname, hosts_store=False))]
    return [(f"node {r}" + (f" (the master, {cfg.master_host})" if r == 0 and cfg.multinode else ""),
             node_command(cfg, r, ifname=ifname)) for r in range(cfg.nnodes_max)]


SLURM_SIGNAL_LEAD_S = 120
HANG_REQUEUES = 3  # a job whose rank hung is requeued this many times at most (a hang that always recurs is a bug)
"""Seconds before the time limit at which Slurm signals the batch script (``--signal=B:USR1@120``)."""


def slurm_script(cfg: LaunchConfig, *, launcher_cmd: str) -> str:
    """An sbatch script that starts this run on ``cfg.nnodes_max`` nodes: one srun task (one torchrun) each.

    Each task runs this launcher with no address flags: under srun it reads its node, the master (the step's
    first node, by name or by the ``NodeAddr`` Slurm knows it by) and a port from the job id, and pins gloo to
    the route to the master. Preemption: Slurm signals the batch script (``--signal=B:USR1@N``; also ``scancel
    --signal=USR1 --batch|--full``), which forwards it through srun to torchrun, which forwards it to the
    workers (train.py gets ``--preempt-signal SIGUSR1``: it checkpoints at its next step and exits 143); the
    script then requeues the job, and the rerun resumes from that checkpoint (``--resume auto``).
    """
    script_args = list(cfg.script_args)
    if os.path.basename(cfg.script) == "train.py":
        if "--resume" not in script_args:
            script_args += ["--resume", "auto"]  # a requeued job continues; a fresh one starts (nothing to resume)
        if "--preempt-signal" not in script_args:
            script_args += ["--preempt-signal", "SIGUSR1"]  # the --signal below: checkpoint, then exit 143
    opts = [f"--nproc-per-node {cfg.nproc_per_node}", f"--rdzv {cfg.rdzv}", f"--engine {cfg.engine}",
            f"--join-timeout {cfg.join_s}", f"--max-restarts {cfg.max_restarts}", "--forward-signal SIGUSR1"]
    if cfg.ifname:
        opts.append(f"--ifname {shlex.quote(cfg.ifname)}")
    gres = [f"#SBATCH --gpus-per-node={cfg.nproc_per_node}"] if cfg.gpus else []
    train = " ".join([shlex.quote(cfg.script), *map(shlex.quote, script_args)])
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=anytopo",
        f"#SBATCH --nodes={cfg.nnodes_max}",
        *gres,
        f"#SBATCH --signal=B:USR1@{SLURM_SIGNAL_LEAD_S}           # SIGUSR1 to this script {SLURM_SIGNAL_LEAD_S} s "
        "before the time limit: B:USR1@SECONDS to change",
        "#SBATCH --requeue                      # may go back in the queue (node failure, or requeued below)",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=anytopo-%j.out",
        "set -uo pipefail",
        "# Each task runs anytopo-launch, which reads its node, the master (the job's first node, by name or by its",
        "# Slurm NodeAddr) and a port from the job, checks the node, then execs torchrun. Rank 0 writes the",
        "# checkpoints: --output-dir must be on a filesystem every node sees (a rerun may start elsewhere).",
        "# Preemption: SIGUSR1 (the --signal above, or scancel --signal=USR1 --batch|--full JOB) goes through srun",
        "# to torchrun and the workers; train.py checkpoints at its next step and exits 143; this script then",
        "# requeues the job, and the rerun (SLURM_RESTART_COUNT=1, 2, ...) resumes from that checkpoint. Slurm",
        "# checks the time limit every 30 s: the signal can come up to a minute before the lead time.",
        f"# A hung rank (train.py's watchdog, exit {HUNG_EXIT_CODE}) requeues the job too, at most {HANG_REQUEUES} times: the rerun",
        "# may get other nodes, and resumes from the newest checkpoint.",
        "preempted=0",
        'forward() { preempted=1; kill -USR1 "$step" 2>/dev/null; }',
        "trap forward USR1",
        "# one task per node (one torchrun agent, which starts the processes): a range such as sbatch --nodes=1-2",
        "# then gets every node it can, and a rerun after a lost node runs on the ones left",
        'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\',
        f"    {launcher_cmd} {' '.join(opts)} \\",
        f"    {train} &",
        "step=$!",
        'wait "$step"; rc=$?',
        'while kill -0 "$step" 2>/dev/null; do wait "$step"; rc=$?; done  # a trapped signal ends wait early',
        'if [ "$preempted" = 1 ] || [ "$rc" = 143 ]; then',
        '    echo "anytopo: job $SLURM_JOB_ID preempted (run ${SLURM_RESTART_COUNT:-0}): requeueing it; the rerun resumes"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
        f'if [ "$rc" = {HUNG_EXIT_CODE} ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {HANG_REQUEUES} ]; then',
        '    echo "anytopo: job $SLURM_JOB_ID had a hung rank (run ${SLURM_RESTART_COUNT:-0}): requeueing it; the rerun resumes"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return _run(args)
    except LaunchError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def _run(args: argparse.Namespace) -> int:
    # the sbatch script sets the master itself, from the allocation
    cfg = LaunchConfig.from_args(args, gpus=_visible_gpus(), need_master=not args.slurm)
    preflight.check_script(cfg.script)
    if args.dry_run or args.slurm:
        if args.slurm:
            print(slurm_script(cfg, launcher_cmd=f"{shlex.quote(sys.executable)} -m launcher"), end="")
            return 0
        for who, cmd in plan(cfg):
            print(f"# {who}")
            print(cmd.shell())
        return 0
    if cfg.multinode and cfg.rdzv == "static" and cfg.node_rank is None:
        raise LaunchError(f"--nnodes {cfg.nnodes_max} with static rendezvous needs this node's rank: pass "
                          "--node-rank R (0 on the master, 1.. on the others), or --rdzv c10d")
    ifname = cfg.ifname or next((os.environ[v] for v in preflight.IFNAME_VARS if os.environ.get(v)), None)
    if ifname == "auto":
        ifname = preflight.route_interface(preflight.resolve(cfg.master_host, cfg.master_port))
        if ifname is None:
            raise LaunchError(f"--ifname auto found no interface that routes to the master {cfg.master_host}: "
                              "pass --ifname IFACE (see `ip -br addr`)")
    target = preflight.Target(script=cfg.script, nnodes_max=cfg.nnodes_max, nproc_per_node=cfg.nproc_per_node,
                              rdzv=cfg.rdzv, node_rank=cfg.node_rank, node_rank_given=cfg.node_rank_given,
                              master_host=cfg.master_host, master_port=cfg.master_port, ifname=ifname, gpus=cfg.gpus)
    master_ip = preflight.run_checks(target, note=lambda msg: print(f"anytopo-launch: {msg}", file=sys.stderr))
    hosts_store = None
    if master_ip is not None and not _loopback(master_ip):
        hosts_store = preflight.is_local_address(master_ip)
    local_addr = None
    if cfg.multinode and cfg.rdzv == "c10d" and ifname:
        local_addr = dict(preflight.interfaces()).get(ifname)
        if local_addr is None:
            raise LaunchError(f"interface {ifname!r} has no IPv4 address on this host: pass --ifname with one of "
                              f"{', '.join(n for n, _ in preflight.interfaces())}")
    cmd = node_command(cfg, cfg.node_rank, ifname=ifname if cfg.ifname else None, hosts_store=hosts_store,
                       local_addr=local_addr)
    if cfg.multinode and cfg.rdzv == "c10d":
        print("anytopo-launch: c10d gives rank 0 (the one that writes checkpoints) to whichever node joins first, "
              "not necessarily the master: keep --output-dir on a filesystem every node sees, or use --rdzv static",
              file=sys.stderr)
    where = "this node" if cfg.node_rank is None else f"node {cfg.node_rank}/{cfg.nnodes_max}"
    print(f"anytopo-launch: {where}: {cmd.shell()}", file=sys.stderr, flush=True)
    env = {**os.environ, **cmd.env}
    try:
        os.execvpe(cmd.argv[0], cmd.argv, env)
    except OSError as e:
        raise LaunchError(f"cannot start {cmd.argv[0]!r} ({e.strerror}): install it in this environment "
                          "(pip install torch accelerate) or activate the venv") from None
    return 0  # not reached


def _parse_nnodes(value: str) -> tuple[int, int]:
    try:
        lo, _, hi = value.partition(":")
        return int(lo), int(hi or lo)
    except ValueError:
        raise LaunchError(f"--nnodes {value!r} is not N or N:M: pass e.g. --nnodes 2 or --nnodes 2:4") from None


def _parse_nproc(value: str, gpus: int) -> int:
    if value == "auto":
        return gpus or 1
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"--nproc-per-node {value!r} is not a number: pass K or auto") from None


def _parse_master(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise LaunchError(f"--master {value!r} is not HOST:PORT: pass e.g. --master node01:{DEFAULT_PORT}")
    return host.strip("[]"), int(port)


def _signal_name(value: str) -> str:
    import signal

    name = value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()
    if not hasattr(signal, name):
        raise LaunchError(f"--forward-signal {value!r} is not a signal name: pass e.g. SIGUSR1")
    return name


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _venv_tool(name: str) -> str:
    """The console script ``name`` next to this interpreter (the venv's), else whatever PATH finds."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.access(beside, os.X_OK) else name


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
