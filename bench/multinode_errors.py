"""Time from start to the error line for the multi-node failures of issue 11, on two network-namespace hosts.

    sudo .venv/bin/python bench/multinode_errors.py [--join-timeout 120]     # root: it makes 2 namespaces

Cases (all started at once, each a real anytopo-launch / torchrun on one of the hosts):
  missing node   static node 0 alone; static node 1 alone; c10d node alone (2-node runs)
  unresolvable   --master no-such-host.invalid:PORT
  unreachable    --master <an unused address of the veth subnet>:PORT
  loopback name  no --ifname on a host whose name resolves to 127.0.0.1: pre-flight (anytopo-launch), and
                 plain torchrun + train.py --dist-timeout S (no launcher): the rank that hits the loopback
                 address and its peer, which waits out the timeout
Prints one row per case (seconds, exit status, last stderr line) and writes bench/results/multinode_errors.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from _netns import two_hosts, unavailable
from _common import child_env, free_port

TRAIN = str(REPO / "scripts" / "train.py")
MLP = ["--model", "mlp", "--data", "digits", "--num-samples", "400", "--batch-size", "32", "--max-steps", "2",
       "--no-progress", "--no-tensorboard", "--strategy", "ddp"]
LAUNCH = [sys.executable, "-m", "launcher"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--join-timeout", type=int, default=120)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "multinode_errors.json")
    args = p.parse_args()
    why = unavailable()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    j = str(args.join_timeout)
    with two_hosts(tag=249) as (a, b):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                    f"--master-addr={a.addr}"]
        tr_port = free_port()
        cases = {
            "missing node: static node 0 alone": a.cmd([*LAUNCH, "--nnodes", "2", "--node-rank", "0", "--join-timeout",
                                                        j, "--master", f"{a.addr}:{free_port()}", "--ifname", a.ifname,
                                                        TRAIN]),
            "missing node: static node 1 alone": b.cmd([*LAUNCH, "--nnodes", "2", "--node-rank", "1", "--join-timeout",
                                                        j, "--master", f"{a.addr}:{free_port()}", "--ifname", b.ifname,
                                                        TRAIN]),
            "missing node: c10d node alone": a.cmd([*LAUNCH, "--nnodes", "2", "--rdzv", "c10d", "--join-timeout", j,
                                                    "--master", f"{a.addr}:{free_port()}", "--ifname", a.ifname, TRAIN]),
            "unresolvable master": b.cmd([*LAUNCH, "--nnodes", "2", "--node-rank", "1", "--master",
                                          "no-such-host.invalid:29500", "--ifname", b.ifname, TRAIN]),
            "unreachable master": b.cmd([*LAUNCH, "--nnodes", "2", "--node-rank", "1", "--master",
                                         f"{a.addr.rsplit('.', 1)[0]}.77:29500", "--ifname", b.ifname, TRAIN]),
            "loopback host name: anytopo-launch": a.cmd([*LAUNCH, "--nnodes", "2", "--node-rank", "0", "--master",
                                                         f"{a.addr}:{free_port()}", TRAIN]),
            "loopback host name: torchrun node 0 (train.py --dist-timeout)": a.cmd(
                [*torchrun, "--node-rank=0", f"--master-port={tr_port}", TRAIN, *MLP, "--dist-timeout", j,
                 "--output-dir", "/tmp/anytopo-bench-loopback"]),
            "loopback host name: torchrun node 1 (train.py --dist-timeout)": b.cmd(
                [*torchrun, "--node-rank=1", f"--master-port={tr_port}", TRAIN, *MLP, "--dist-timeout", j,
                 "--output-dir", "/tmp/anytopo-bench-loopback"]),
        }
        t0 = time.monotonic()
        procs = {k: subprocess.Popen(v, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True) for k, v in cases.items()}
        ends: dict[str, tuple[float, str]] = {}

        def wait(name: str, proc: subprocess.Popen) -> None:
            try:
                _, err = proc.communicate(timeout=args.join_timeout * 3 + 120)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            ends[name] = (time.monotonic() - t0, err)

        waiters = [threading.Thread(target=wait, args=item) for item in procs.items()]
        for w in waiters:
            w.start()
        for w in waiters:
            w.join()
        rows = []
        for name, proc in procs.items():
            seconds, err = ends[name]
            errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
            rows.append({"case": name, "seconds": round(seconds, 1), "exit": proc.returncode,
                         "error": errors[-1] if errors else (err.strip().splitlines() or [""])[-1][:300],
                         "command": " ".join(cases[name][4:])})
    print(f"join timeout {args.join_timeout} s; all cases started together on 2 cores (seconds are upper bounds)")
    for r in rows:
        print(f"{r['seconds']:7.1f} s  exit {r['exit']}  {r['case']}\n           {r['error'][:400]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"join_timeout": args.join_timeout, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
