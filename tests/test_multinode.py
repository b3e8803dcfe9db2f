"""anytopo-launch across two "hosts" (network namespaces on a veth pair) and on localhost.

Real launches only: ``python -m launcher`` pre-flights, then execs torchrun (``launcher.torchrun``) or
accelerate, which start scripts/train.py with gloo. Every wait is bounded (subprocess timeouts, short
``--join-timeout``); the namespaces are deleted by the fixture whatever happens.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

import launcher.launch as launch
from launcher import LaunchError
from launcher.dist import explain_init_failure, resolve_timeout
from launcher.env import read_env
from _netns import two_hosts, unavailable
from conftest import REPO, child_env, free_port, train_py

pytestmark = pytest.mark.multiproc

TRAIN = str(REPO / "scripts" / "train.py")
MLP = ["--model", "mlp", "--data", "digits", "--num-samples", "400", "--batch-size", "32", "--max-steps", "4",
       "--lr", "0.01", "--warmup-steps", "1", "--no-progress", "--no-tensorboard"]
LAUNCH = [sys.executable, "-m", "launcher"]
RUN_TIMEOUT = 180


@pytest.fixture(scope="module")
def hosts():
    why = unavailable()
    if why:
        pytest.skip(f"two-host tests need network namespaces: {why}")
    with two_hosts() as pair:
        yield pair


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen], timeout: float = RUN_TIMEOUT) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _same_metrics(run: dict, ref: dict) -> None:
    assert run["steps"] == ref["steps"] and run["world_size"] == 4 and ref["world_size"] == 1
    assert run["eval"] == ref["eval"]  # accuracy: exact aggregation over the shards
    # the loss is a DDP average of 4 per-rank means vs one mean over the same 32 samples: float rounding only
    assert run["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-4)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    done = train_py([*MLP, "--output-dir", str(out)], timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return _summary(out)


# ------------------------------------------------------------------------------- plans (no processes)

def test_dry_run_prints_every_nodes_command(capsys):
    assert launch.main(["--nnodes", "2", "--nproc-per-node", "2", "--master", "10.0.0.5:29400", "--ifname", "ib0",
                        "--join-timeout", "45", "--dry-run", TRAIN, "--strategy", "ddp"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# node 0 (the master, 10.0.0.5)" and lines[2] == "# node 1"
    for rank, line in enumerate(lines[1::2]):
        assert line.startswith("OMP_NUM_THREADS=") and "GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=ib0" in line
        assert "ANYTOPO_DIST_TIMEOUT=45 " in line
        assert f"-m launcher.torchrun --nnodes=2 --nproc-per-node=2 --node-rank={rank} --master-addr=10.0.0.5 " \
               f"--master-port=29400 --rdzv-conf=join_timeout=45,timeout={(45, 18)[rank]} --max-restarts=0 " in line
        assert line.endswith(f"{TRAIN} --strategy ddp")
    assert launch.main(["--nnodes", "2:4", "--rdzv", "c10d", "--master", "10.0.0.5:29400", "--dry-run", TRAIN]) == 0
    [host, host_cmd, other, other_cmd] = capsys.readouterr().out.splitlines()
    assert host.startswith("# the node at 10.0.0.5 (serves the c10d store") and other == "# every other node"
    for cmd, is_host in ((host_cmd, 1), (other_cmd, 0)):
        assert "--node-rank" not in cmd
        assert "--nnodes=2:4 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=10.0.0.5:29400 " \
               f"--rdzv-id=anytopo-10.0.0.5-29400 --rdzv-conf=join_timeout=120,timeout=120,read_timeout=48," \
               f"keep_alive_interval=3,keep_alive_max_attempt=3,last_call_timeout=10,is_host={is_host} " in cmd
    # a fixed node count under c10d has no last call; the node-loss wait is the user's, in whole seconds
    assert launch.main(["--nnodes", "2", "--rdzv", "c10d", "--master", "10.0.0.5:29400", "--node-loss-timeout", "4",
                        "--dry-run", TRAIN]) == 0
    out = capsys.readouterr().out
    assert "keep_alive_interval=1,keep_alive_max_attempt=3,is_host=" in out and "last_call" not in out
    for bad, why in ((["--node-loss-timeout", "2"], "--node-loss-timeout 2 must be >= 3 seconds"),
                     (["--last-call", "0"], "--last-call 0 must be >= 1 second")):
        assert launch.main(["--nnodes", "1:2", "--rdzv", "c10d", "--master", "10.0.0.5:29400", *bad, "--dry-run",
                            TRAIN]) == 2
        assert why in capsys.readouterr().err
    assert launch.main(["--nnodes", "2", "--engine", "accelerate", "--master", "10.0.0.5:29400", "--dry-run",
                        TRAIN]) == 0
    acc = capsys.readouterr().out.splitlines()[3]
    assert "ACCELERATE_USE_CPU=1" in acc and "launch --multi_gpu --num_machines 2 --num_processes 2" in acc
    assert "--machine_rank 1 --main_process_ip 10.0.0.5 --main_process_port 29400 --rdzv_backend static" in acc


def test_slurm_prints_a_ready_sbatch_script(capsys):
    """The script itself (tests/test_slurm.py runs it on a real cluster): one task per node, no address flags
    (each task reads them from the job), the preemption signal to the batch script, forwarded and requeued."""
    assert launch.main(["--nnodes", "4", "--nproc-per-node", "8", "--slurm", TRAIN, "--strategy", "ddp"]) == 0
    script = capsys.readouterr().out
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash" and "#SBATCH --nodes=4" in lines and "#SBATCH --requeue" in script
    assert any(ln.startswith("#SBATCH --signal=B:USR1@120") for ln in lines)
    assert "trap forward USR1" in lines and 'forward() { preempted=1; kill -USR1 "$step" 2>/dev/null; }' in lines
    assert '    scontrol requeue "$SLURM_JOB_ID" && exit 0' in lines
    i = next(i for i, ln in enumerate(lines) if ln.startswith("srun "))
    assert lines[i].startswith('srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 ')
    srun = lines[i + 1]  # one task per node, whatever the allocation (a range --nodes=1-2 included)
    assert "-m launcher --nproc-per-node 8 --rdzv static" in srun and "--forward-signal SIGUSR1" in srun
    assert "--master" not in srun and "--nnodes" not in srun  # from the job, on each node
    assert next(ln for ln in lines if ln.lstrip().startswith(TRAIN)).endswith(
        "--strategy ddp --resume auto --preempt-signal SIGUSR1 &")
    # bash accepts it
    assert subprocess.run(["bash", "-n"], input=script, text=True, timeout=10).returncode == 0


def test_bad_plans_exit_2_with_one_line(tmp_path):
    cases = [
        (["--nnodes", "2", TRAIN], "pass --master HOST:PORT"),
        (["--nnodes", "2:3", "--master", "127.0.0.1:1", TRAIN], "add --rdzv c10d"),
        (["--nnodes", "2", "--master", "127.0.0.1:1", str(tmp_path / "nope.py")], "does not exist"),
    ]
    for args, fix in cases:
        p = subprocess.run([*LAUNCH, *args], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and fix in p.stderr, p.stderr
        assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1


# ------------------------------------------------------------------------ pre-flight on two hosts

def test_preflight_catches_each_mistake_in_seconds(hosts):
    a, b = hosts
    port = free_port()
    cases = [  # (host, launcher args, what the one line must say)
        (a, ["--nnodes", "2", "--node-rank", "0", "--master", f"{a.addr}:{port}"],
         f"resolves to 127.0.0.1, so gloo/NCCL would give the other nodes a loopback address and they could never "
         f"connect: pass --ifname {a.ifname}"),
        (b, ["--nnodes", "2", "--node-rank", "1", "--master", f"no-such-host.invalid:{port}", "--ifname", b.ifname],
         "does not resolve"),
        (b, ["--nnodes", "2", "--node-rank", "1", "--master", f"{a.addr[:-1]}9:{port}", "--ifname", b.ifname],
         "cannot open a TCP connection to the master"),
        (b, ["--nnodes", "2", "--rdzv", "c10d", "--node-rank", "1", "--master", f"{a.addr}:{port}"],
         "drop --node-rank"),
    ]
    procs = [(_start(h.cmd([*LAUNCH, *args, TRAIN])), fix, time.monotonic()) for h, args, fix in cases]
    errs = []
    for p, fix, t0 in procs:
        _, err = p.communicate(timeout=60)
        errs.append(err)
        elapsed = time.monotonic() - t0
        assert p.returncode == 2, err
        assert err.startswith("error: ") and fix in err and err.count("\n") == 1, err
        assert elapsed < 20, f"{fix}: {elapsed:.1f}s"  # seconds (import, 5 s connect probe), not minutes
    assert f"GLOO_SOCKET_IFNAME={a.ifname} NCCL_SOCKET_IFNAME={a.ifname}" in errs[0]
    assert errs[0].rstrip().endswith(f"interfaces with an address: {a.ifname} {a.addr}")


def test_two_nodes_static_and_c10d_equal_one_process(hosts, one_process, tmp_path):
    a, b = hosts
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--join-timeout", "60"]
    for rdzv in ("static", "c10d"):
        out, port = tmp_path / rdzv, free_port()
        script = [TRAIN, *MLP, "--strategy", "ddp", "--output-dir", str(out)]
        if rdzv == "static":
            nodes = [h.cmd([*LAUNCH, *common, "--node-rank", str(r), "--master", f"{a.addr}:{port}",
                            "--ifname", h.ifname, *script]) for r, h in enumerate((a, b))]
        else:
            nodes = [h.cmd([*LAUNCH, *common, "--rdzv", "c10d", "--master", f"{a.addr}:{port}", "--ifname", "auto",
                            *script]) for h in (a, b)]
        results = _finish([_start(n) for n in nodes])
        assert [rc for rc, _ in results] == [0, 0], "\n".join(err[-2500:] for _, err in results)
        assert "anytopo-launch: node 0/2:" in results[0][1] or rdzv == "c10d"
        assert "launcher.torchrun" in results[0][1]
        _same_metrics(_summary(out), one_process)


@pytest.mark.slow  # a long fault/cluster run (~17 s on 2 cores): `make test-slow`, which .ci/run runs after `make test`
def test_missing_node_is_reported_within_the_bound(hosts):
    a, b = hosts
    join = 8
    base = ["--nnodes", "2", "--join-timeout", str(join)]
    runs = {  # each is one node of a 2-node run whose other node never starts
        "static master": a.cmd([*LAUNCH, *base, "--node-rank", "0", "--master", f"{a.addr}:{free_port()}",
                                "--ifname", a.ifname, TRAIN]),
        "static worker": b.cmd([*LAUNCH, *base, "--node-rank", "1", "--master", f"{a.addr}:{free_port()}",
                                "--ifname", b.ifname, TRAIN]),
        "c10d": a.cmd([*LAUNCH, *base, "--rdzv", "c10d", "--master", f"{a.addr}:{free_port()}", "--ifname",
                       a.ifname, TRAIN]),
    }
    t0 = time.monotonic()
    procs = {k: _start(v) for k, v in runs.items()}
    ends: dict[str, tuple[int, str, float]] = {}
    for k, p in procs.items():
        _, err = p.communicate(timeout=join + 60)
        ends[k] = (p.returncode, err, time.monotonic() - t0)
    for k, (rc, err, elapsed) in ends.items():
        last = err.strip().splitlines()[-1]
        assert rc == 2 and last.startswith("error: "), f"{k}: {err[-2000:]}"
        # the bound proves --join-timeout is what ends the wait (torch's own defaults are 600 s / 900 s); the
        # slack is for three launchers, each importing torch, starting on 2 busy cores (join + 15 s failed once
        # under another job's load)
        assert elapsed < join + 40, f"{k} took {elapsed:.1f}s"
        assert "Traceback" not in err, f"{k}: {err[-2000:]}"
    assert f"(the master) waited" in ends["static master"][1] and f"at {a.addr}:" in ends["static master"][1]
    assert "1 of 2 node(s) joined" in ends["static master"][1]
    assert "never answered (0 of 2 nodes seen from here): start node rank 0" in ends["static worker"][1]
    assert "at the c10d rendezvous" in ends["c10d"][1] and "1 of 2 node(s) joined" in ends["c10d"][1]


# -------------------------------------------------------------------------------------- localhost

def test_accelerate_engine_two_machines_on_localhost(one_process, tmp_path):
    out, port = tmp_path / "acc", free_port()
    nodes = [[*LAUNCH, "--engine", "accelerate", "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(r),
              "--master", f"127.0.0.1:{port}", "--join-timeout", "60", TRAIN, *MLP, "--strategy", "ddp",
              "--output-dir", str(out)] for r in (0, 1)]
    results = _finish([_start(n) for n in nodes])
    assert [rc for rc, _ in results] == [0, 0], "\n".join(err[-2500:] for _, err in results)
    assert "accelerate launch --multi_gpu --num_machines 2 --num_processes 4" in results[1][1]
    s = _summary(out)
    _same_metrics(s, one_process)


# ------------------------------------------------------------------ the script side of bounded waits

def test_train_dist_timeout_bounds_the_wait_for_missing_ranks(tmp_path):
    # rank 0 of 2, whose peer never starts: without --dist-timeout this waited 300 s
    env = child_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port()))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, TRAIN, *MLP, "--strategy", "ddp", "--dist-timeout", "3", "--output-dir",
                        str(tmp_path / "o")], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 0 of 2 could not form the process group at 127.0.0.1:")
    assert "(timeout 3s;" in last and "start all 2 processes" in last
    assert re.search(r"after [3-9]s", last), last  # the real elapsed time, not the timeout's value
    assert time.monotonic() - t0 < 40


def test_timeout_comes_from_the_launcher_when_the_script_gives_none():
    assert resolve_timeout(None, {}) == 300
    assert resolve_timeout(None, {"ANYTOPO_DIST_TIMEOUT": "130"}) == 130
    assert resolve_timeout(7, {"ANYTOPO_DIST_TIMEOUT": "130"}) == 7
    with pytest.raises(LaunchError, match="ANYTOPO_DIST_TIMEOUT='soon' is not a number"):
        resolve_timeout(None, {"ANYTOPO_DIST_TIMEOUT": "soon"})


def test_refused_loopback_peer_names_the_interface_variables():
    env = read_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "10.231.0.1", "MASTER_PORT": "29500"})
    err = RuntimeError("Gloo connectFullMesh failed with [pair.cc:152] timed out connecting: SO_ERROR: "
                       "Connection refused, remote=[127.0.0.1]:57734$1")
    msg = explain_init_failure(env, "10.231.0.1:29500", 5.2, 300, err)
    assert msg.startswith("rank 1 of 4 could not form the process group at 10.231.0.1:29500 after 5s (timeout 300s;")
    assert "a peer advertised the loopback address 127.0.0.1" in msg and "GLOO_SOCKET_IFNAME" in msg
    assert "NCCL_SOCKET_IFNAME" in msg and "\n" not in msg
    # every node on this host: loopback is right, so the generic fix
    local = read_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert "advertised" not in explain_init_failure(local, "127.0.0.1:29500", 1, 300, err)


@pytest.mark.parametrize("env, fix", [
    # `python train.py` in an sbatch script: SLURM_NTASKS describes the allocation, this is the batch step
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
      "SLURM_TASKS_PER_NODE": "1(x2)", "MASTER_ADDR": "n0", "MASTER_PORT": "1"},
     "sbatch batch step (no SLURM_STEP_ID), which is one process on the first node: start the tasks with `srun"),
    # `accelerate launch --cpu --num_machines 2 --main_process_ip n0`: one plain process per machine
    ({"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "10.0.0.5",
      "MASTER_PORT": "29500"},
     "accelerate launch --multi_gpu --num_machines M --machine_rank R"),
])
def test_script_side_messages_name_the_right_fix(env, fix):
    with pytest.raises(LaunchError) as err:
        read_env(env)
    assert fix in str(err.value) and "--num_machines 1" not in str(err.value) and "\n" not in str(err.value)
    assert "anytopo-launch" in str(err.value)


def test_srun_tasks_are_not_taken_for_the_batch_step():
    e = read_env({"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
                  "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "1(x2)", "MASTER_ADDR": "n0",
                  "MASTER_PORT": "1"})
    assert (e.launcher, e.rank, e.world_size, e.node_rank) == ("slurm", 1, 2, 1)


def test_peer_of_a_rank_that_fails_in_gloo_connect_does_not_hang(hosts, tmp_path):
    # plain torchrun, no launcher, no interface pinned: both host names resolve to 127.0.0.1, so a rank fails in
    # gloo's connect at once; its peer used to wait ~5x the timeout inside gloo (100 s for 20 s)
    a, b = hosts
    port, timeout = free_port(), 60
    nodes = [h.cmd([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                    f"--node-rank={r}", f"--master-addr={a.addr}", f"--master-port={port}", TRAIN, *MLP,
                    "--strategy", "ddp", "--dist-timeout", str(timeout), "--output-dir", str(tmp_path / "o")])
             for r, h in enumerate((a, b))]
    t0 = time.monotonic()
    results = _finish([_start(n) for n in nodes], timeout=timeout * 3)
    elapsed = time.monotonic() - t0
    assert all(rc != 0 for rc, _ in results)
    errors = [[ln for ln in err.splitlines() if ln.startswith("error: rank")] for _, err in results]
    joined = "\n".join(sum(errors, []))
    assert "a peer advertised the loopback address 127.0.0.1" in joined and "GLOO_SOCKET_IFNAME" in joined
    assert "another rank failed to join the process group, so this one stops" in joined
    assert all(errors), joined
    assert elapsed < timeout / 2, f"{elapsed:.0f}s"  # well before the timeout, let alone 5x it


@pytest.mark.slow  # a long fault/cluster run (~15 s on 2 cores): `make test-slow`, which .ci/run runs after `make test`
@pytest.mark.timeout(60)
def test_peer_watch_waits_for_a_store_that_is_not_up_yet():
    """A rank that starts before the host of the rendezvous store (plain srun, hand-set env) keeps waiting:
    only a store it once reached and then lost ends it ("went away")."""
    code = f"""
import time, types
from launcher.dist import _PeerWatch
env = types.SimpleNamespace(master_addr="127.0.0.1", master_port={free_port()}, rank=1, world_size=2)
watch = _PeerWatch(env)
time.sleep(12)  # several polls with nothing listening
watch.stop()
print("alive")
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                       timeout=50)
    assert p.returncode == 0 and p.stdout.strip() == "alive", (p.returncode, p.stderr[-2000:])


def test_rendezvous_settings_reach_torchs_c10d_handler(capsys):
    """The --rdzv-conf the launcher builds is read by torch's c10d handler as meant (an unknown or misspelt key
    would be ignored silently): a dead node dropped after 3 heartbeats S/3 apart, the last call as given."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    assert launch.main(["--nnodes", "1:3", "--rdzv", "c10d", "--master", "10.0.0.5:29400", "--node-loss-timeout", "12",
                        "--last-call", "4", "--join-timeout", "50", "--dry-run", TRAIN]) == 0
    cmd = capsys.readouterr().out.splitlines()[1]
    conf = dict(kv.split("=", 1) for kv in cmd.split("--rdzv-conf=")[1].split()[0].split(","))
    params = RendezvousParameters(backend="c10d", endpoint="10.0.0.5:29400", run_id="t", min_nodes=1, max_nodes=3,
                                  **conf)
    store = dist.HashStore()
    settings = create_handler(store, C10dRendezvousBackend(store, "t"), params)._settings
    assert settings.keep_alive_interval == timedelta(seconds=4) and settings.keep_alive_max_attempt == 3
    assert settings.timeout.last_call == timedelta(seconds=4) and settings.timeout.join == timedelta(seconds=50)
