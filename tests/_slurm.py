"""A real two-node Slurm cluster on this machine (Debian's Slurm 22.05), for the cluster tests and by hand.

    python tests/_slurm.py up        # start one, print how to use it, keep it up until Ctrl-C, tear it down
    make slurm-cluster               # the same, from the repository root

Two "hosts" are two network namespaces joined by a veth pair (bench/_netns.py): ``node1`` at 10.231.T.1 runs
``slurmctld`` (as host ``ctl``) and a ``slurmd``, ``node2`` at 10.231.T.2 runs the other ``slurmd``. Each daemon
runs in its node's network namespace with its own host name (a UTS namespace), so job steps see the node's
address and name; the filesystem is shared, as a cluster's would be. Everything is private to one directory
(the configuration exported as ``SLURM_CONF``, state, spool, logs, pid files) and to one ``munged`` with its own
socket; nothing is written under /etc. By default the node names do not resolve (``NodeName=node1
NodeAddr=10.231.T.1``, no hosts entry), as on clusters that address nodes by an InfiniBand address; ``resolvable``
gives each node a hosts file that names both.

Every client command (``sbatch``, ``scontrol``, ...) runs in node1's network namespace with ``SLURM_CONF``
set, and has a timeout: with a node down, ``sbatch --wait`` would wait forever. Teardown cancels every job,
waits for an empty queue, stops each daemon by pid and deletes the namespaces, whatever happened before.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from _netns import Host, two_hosts
from _netns import unavailable as netns_unavailable

BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "munged")
CTL_PORT, SLURMD_PORT = 6817, 6818  # inside the namespaces: nothing else listens there


def unavailable() -> str | None:
    """Why a cluster cannot be started here (None if it can)."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        return (f"{', '.join(missing)} not installed: apt-get install -y --no-install-recommends slurmctld slurmd "
                "slurm-client munge")
    if not Path("/etc/munge/munge.key").is_file():
        return "no /etc/munge/munge.key (the munge package creates it)"
    return netns_unavailable()


@dataclass
class SlurmCluster:
    root: Path
    hosts: list[Host]
    names: list[str]
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def addr(self, name: str) -> str:
        return self.hosts[self.names.index(name)].addr

    def client(self, argv: list[str], *, timeout: float = 30, check: bool = True, node: str = "node1",
               env: dict[str, str] | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """A Slurm client command run from ``node`` (its network namespace), with this cluster's SLURM_CONF."""
        host = self.hosts[self.names.index(node)]
        proc = subprocess.run(["nsenter", f"--net=/run/netns/{host.ns}", *argv], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        return proc

    def sbatch(self, script: str | Path, *args: str, cwd: str | Path, env: dict[str, str] | None = None) -> int:
        """Submit ``script`` (a path, or the text of one) with ``args``; returns the job id."""
        if not isinstance(script, Path):
            path = Path(tempfile.mkstemp(prefix="job-", suffix=".sh", dir=self.root)[1])
            path.write_text(script)
            script = path
        out = self.client(["sbatch", "--parsable", f"--chdir={cwd}", *args, str(script)], env=env, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, ExitCode, Restarts, NodeList, ...); {} once it is gone."""
        proc = self.client(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}

    def wait_job(self, job_id: int, states: tuple[str, ...], timeout: float, *, restarts: int | None = None) -> dict:
        """Poll until job ``job_id`` is in one of ``states`` (and, if given, has been restarted that many times)."""
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            seen = self.job(job_id)
            if seen.get("JobState") in states and (restarts is None or int(seen.get("Restarts", 0)) >= restarts):
                return seen
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f} s (last: {seen.get('JobState')}, "
                           f"restarts {seen.get('Restarts')}, reason {seen.get('Reason')}); logs in {self.root}")

    def node_state(self, name: str) -> str:
        out = self.client(["scontrol", "-o", "show", "node", name]).stdout
        m = re.search(r"State=(\S+)", out)
        return m.group(1) if m else "?"

    def kill_node(self, name: str) -> None:
        """The node dies: its slurmd and every process of its job steps, SIGKILL (node2's namespace holds
        nothing else)."""
        if name == "node1":
            raise ValueError("node1 also runs the controller; kill node2")
        host = self.hosts[self.names.index(name)]
        pids = subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        self.procs.pop(f"slurmd-{name}", None)

    def logs(self) -> str:
        """The tail of every daemon's log, for a failing test's message."""
        parts = []
        for log in sorted(self.root.glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)


def _conf(root: Path, hosts: list[Host], names: list[str], slurmd_timeout: int) -> str:
    nodes = "\n".join(f"NodeName={n} NodeAddr={h.addr} CPUs=2 State=UNKNOWN" for n, h in zip(names, hosts))
    return f"""# written by tests/_slurm.py: a private two-node cluster
ClusterName=anytopo
SlurmctldHost=ctl({hosts[0].addr})
SlurmctldPort={CTL_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire seconds (120 by default)
AuthInfo=socket={root}/munge/munge.sock,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SlurmdTimeout={slurmd_timeout}
MessageTimeout=5
KillWait=5
MinJobAge=300
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP
"""


def _daemon(host: Host, hostname: str, argv: list[str], log: Path, hosts_file: Path | None) -> subprocess.Popen:
    """``argv`` in ``host``'s network namespace, under its own host name (and hosts file): nsenter and unshare
    exec it, so the Popen's pid is the daemon's (run in the foreground, -D)."""
    bind = f"mount --bind {hosts_file} /etc/hosts && " if hosts_file else ""
    inner = f"{bind}hostname {hostname} && exec " + " ".join(argv)
    with open(log, "ab") as out:
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{host.ns}", "unshare", "--uts", "--mount",
                                 "--propagation", "private", "sh", "-c", inner],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def slurm_cluster(*, tag: int | None = None, resolvable: bool = False, slurmd_timeout: int = 10,
                  up_timeout: float = 30) -> Iterator[SlurmCluster]:
    """A started two-node cluster (nodes idle), torn down on exit. See the module docstring."""
    tag = (os.getpid() + 37) % 100000 if tag is None else tag
    with ExitStack() as stack:
        a, b = stack.enter_context(two_hosts(tag))
        root = Path(tempfile.mkdtemp(prefix="anytopo-slurm-"))
        stack.callback(shutil.rmtree, root, True)
        os.chmod(root, 0o755)  # munged (user munge) opens its socket under it
        names = ["node1", "node2"]
        (root / "state").mkdir()
        (root / "munge").mkdir(mode=0o755)
        shutil.chown(root / "munge", "munge", "munge")
        conf = root / "slurm.conf"
        conf.write_text(_conf(root, [a, b], names, slurmd_timeout))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(SLURM_CONF=str(conf))
        cluster = SlurmCluster(root, [a, b], names, env)
        munged = subprocess.run(["runuser", "-u", "munge", "--", shutil.which("munged") or "/usr/sbin/munged",
                                 f"--socket={root}/munge/munge.sock", f"--pid-file={root}/munge/munged.pid",
                                 f"--log-file={root}/munge/munged.log", f"--seed-file={root}/munge/seed"],
                                capture_output=True, text=True, timeout=20)
        if munged.returncode != 0:
            raise RuntimeError(f"munged did not start: {munged.stderr.strip()}")
        stack.callback(_kill_pidfile, root / "munge" / "munged.pid")
        hosts_file = None
        if resolvable:
            hosts_file = root / "hosts"
            hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{h.addr} {n}\n" for n, h in zip(names, [a, b])))
        stack.callback(_teardown, cluster)
        cluster.procs["slurmctld"] = _daemon(a, "ctl", ["slurmctld", "-D", "-f", str(conf)], root / "slurmctld.out",
                                             hosts_file)
        for host, name in zip([a, b], names):
            cluster.procs[f"slurmd-{name}"] = _daemon(host, name, ["slurmd", "-D", "-N", name, "-f", str(conf)],
                                                      root / f"slurmd-{name}.out", hosts_file)
        deadline = time.monotonic() + up_timeout
        while True:
            out = cluster.client(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            if all(states.get(n) == "idle" for n in names):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the nodes did not come up in {up_timeout:.0f} s ({states}):\n{cluster.logs()}")
            time.sleep(0.2)
        yield cluster


def _teardown(cluster: SlurmCluster) -> None:
    """Cancel every job, wait for an empty queue (bounded), then stop the daemons by pid."""
    try:
        if cluster.procs.get("slurmctld") is not None and cluster.procs["slurmctld"].poll() is None:
            cluster.client(["scancel", "--full", "--user=root"], check=False, timeout=10)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                out = cluster.client(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.strip()
                if not out:
                    break
                time.sleep(0.5)
    except (subprocess.TimeoutExpired, OSError):
        pass
    for name in [n for n in cluster.procs if n.startswith("slurmd")] + ["slurmctld"]:
        proc = cluster.procs.pop(name, None)
        if proc is not None:
            _stop(proc)


def _kill_pidfile(path: Path) -> None:
    try:
        os.kill(int(path.read_text().strip()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


def main(argv: list[str]) -> int:
    if argv[:1] != ["up"]:
        print(__doc__.split("\n\n")[1])
        return 2
    why = unavailable()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    with slurm_cluster(tag=4242) as c:
        print(f"a two-node Slurm cluster is up (logs and configuration in {c.root}). In another shell:\n"
              f"  export SLURM_CONF={c.conf}\n"
              f"  nsenter --net=/run/netns/{c.hosts[0].ns} sinfo\n"
              f"  nsenter --net=/run/netns/{c.hosts[0].ns} sbatch --wait --chdir $PWD job.sbatch\n"
              "Ctrl-C stops it.", flush=True)
        try:
            while all(p.poll() is None for p in c.procs.values()):
                time.sleep(1)
            print("a daemon stopped: tearing down", file=sys.stderr)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
