"""anytopo on a real Slurm 22.05 cluster of two nodes (tests/_slurm.py): the sbatch script ``anytopo-launch
--slurm`` prints, submitted unchanged; ``srun`` inside an allocation with no address flags, through
anytopo-launch or straight to train.py; preemption by signal and requeue; node names that resolve nowhere.

Marked ``cluster``: ``make test-cluster`` runs them (.ci/run does), after making sure Slurm and munge are
installed. Every job is bounded by a timeout; the cluster is torn down whatever happens.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
from conftest import REPO, train_py

import _slurm

pytestmark = [pytest.mark.cluster, pytest.mark.multiproc]

MLP = ["--model", "mlp", "--data", "digits", "--num-samples", "400", "--batch-size", "32", "--max-steps", "4",
       "--lr", "0.01", "--warmup-steps", "1", "--no-progress", "--no-tensorboard"]
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
JOB_TIMEOUT = 110


@pytest.fixture(scope="module")
def cluster():
    why = _slurm.unavailable()
    if why:  # make test-cluster installs Slurm first: a missing one is a failure, not a skip
        pytest.fail(f"cannot start a Slurm cluster here: {why}")
    with _slurm.slurm_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    done = train_py([*MLP, "--output-dir", str(out)], timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def generated_sbatch(*train_args: str, nproc: int = 2, engine: str = "torchrun") -> str:
    """What a user gets from ``anytopo-launch --slurm`` for a two-node run of train.py."""
    return subprocess.run([sys.executable, "-m", "launcher", "--nnodes", "2", "--nproc-per-node", str(nproc),
                           "--engine", engine, "--slurm", "scripts/train.py", *train_args], cwd=REPO,
                          capture_output=True, text=True, check=True, timeout=60).stdout


def run_job(cluster: _slurm.SlurmCluster, script: str, *sbatch_args: str, timeout: float = JOB_TIMEOUT):
    """Submit, wait for the end, return (scontrol's fields, the job's output)."""
    job = cluster.sbatch(script, f"--output={cluster.root}/job-%j.out", *sbatch_args, cwd=REPO)
    fields = cluster.wait_job(job, DONE, timeout)
    return job, fields, (cluster.root / f"job-{job}.out").read_text(errors="replace")


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def same_metrics(run: dict, ref: dict, world: int = 4) -> None:
    assert run["steps"] == ref["steps"] and run["world_size"] == world and ref["world_size"] == 1
    assert run["eval"] == ref["eval"]  # accuracy: exact aggregation over the shards
    # the loss is an average of per-rank means vs one mean over the same samples: float rounding only
    assert run["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-4)


# ---------------------------------------------------------------------------------------- the script

@pytest.mark.parametrize("strategy,engine", [("ddp", "torchrun"), ("fsdp", "torchrun"), ("ddp", "accelerate")])
@pytest.mark.timeout(180)
def test_the_generated_sbatch_runs_unchanged_on_two_nodes_like_one_process(cluster, one_process, tmp_path, strategy,
                                                                           engine):
    """`anytopo-launch --slurm` -> sbatch, not edited: 2 nodes x 2 processes train like one process, under torchrun
    or accelerate launch. The node names resolve nowhere here: each task finds rank 0 by Slurm's NodeAddr and
    pins gloo to the route to it."""
    out = tmp_path / "run"
    script = generated_sbatch("--strategy", strategy, *MLP, "--output-dir", str(out), engine=engine)
    assert f"--engine {engine}" in script
    _, fields, log = run_job(cluster, script)
    assert fields["JobState"] == "COMPLETED", log[-4000:]
    assert fields["NodeList"] == "node[1-2]"
    master = cluster.addr("node1")
    flag = "--master-addr=" if engine == "torchrun" else "--main_process_ip "
    assert f"{flag}{master} " in log and "does not resolve" not in log, log[-4000:]  # NodeAddr, found by the launcher
    same_metrics(summary(out), one_process)
    manifest = checkpoint.read_manifest(out / "checkpoints")
    assert manifest["topology"]["strategy"] == strategy
    assert manifest["topology"]["launcher"] == engine, manifest["topology"]


@pytest.mark.timeout(180)
def test_srun_inside_an_allocation_needs_no_address_flags(cluster, one_process, tmp_path):
    """In an allocation (here a batch script), `srun anytopo-launch` takes the node count, node rank, master and
    port from Slurm; `srun` with one task per device starts train.py without torchrun (SLURM_PROCID/NTASKS)."""
    py = sys.executable
    via_launcher, direct = tmp_path / "launcher", tmp_path / "direct"
    script = f"""#!/bin/bash
set -euo pipefail
srun --nodes=2 --ntasks=2 --ntasks-per-node=1 {py} -m launcher --nproc-per-node 2 scripts/train.py --strategy ddp \\
    {' '.join(MLP)} --output-dir {via_launcher}
srun --nodes=2 --ntasks=4 --ntasks-per-node=2 {py} scripts/train.py --strategy ddp {' '.join(MLP)} --output-dir {direct}
"""
    _, fields, log = run_job(cluster, script, "--nodes=2", "--ntasks-per-node=2")
    assert fields["JobState"] == "COMPLETED", log[-4000:]
    same_metrics(summary(via_launcher), one_process)
    same_metrics(summary(direct), one_process)
    launched_by = {d.name: checkpoint.read_manifest(d / "checkpoints")["topology"]["launcher"] for d in (via_launcher, direct)}
    assert launched_by == {"launcher": "torchrun", "direct": "slurm"}  # the second: srun's own ranks, no torchrun


def test_a_node_name_that_resolves_nowhere_is_reached_by_its_slurm_nodeaddr(cluster):
    code = ("from launcher import slurm; import os; print(slurm.node_address('node2')); "
            "print(slurm.hosts('node[1-2]'))")
    proc = cluster.client([sys.executable, "-c", code], env={"PYTHONPATH": str(REPO)})
    assert proc.stdout.split("\n")[:2] == [cluster.addr("node2"), "['node1', 'node2']"]


# ----------------------------------------------------------------------------------------- preemption

LONG = ["--model", "mlp", "--data", "digits", "--num-samples", "400", "--batch-size", "32", "--epochs", "100",
        "--max-steps", "120", "--save-every", "10", "--log-every", "1", "--lr", "0.01", "--no-progress",
        "--no-tensorboard"]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_state_dict(out / "checkpoints")


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    _, fields, log = run_job(cluster, generated_sbatch("--strategy", "ddp", *LONG, "--output-dir", str(out)))
    assert fields["JobState"] == "COMPLETED", log[-4000:]
    return out


@pytest.mark.parametrize("scope", ["--batch", "--full"])
@pytest.mark.timeout(200)
def test_a_signalled_job_checkpoints_requeues_itself_and_the_rerun_resumes_exactly(cluster, uninterrupted, tmp_path,
                                                                                 scope):
    """SIGUSR1 (what --signal=B:USR1@N sends before the time limit) by `scancel --signal=USR1 --batch` (the batch
    script only) or `--full` (the script and every task): train.py checkpoints at its next step, torchrun exits
    143, the script requeues the job, and the rerun (SLURM_RESTART_COUNT=1) resumes from that checkpoint: the
    final weights equal the uninterrupted job's, bit for bit (same world size)."""
    out = tmp_path / "run"
    job = cluster.sbatch(generated_sbatch("--strategy", "ddp", *LONG, "--output-dir", str(out)),
                         f"--output={cluster.root}/job-%j.out", cwd=REPO)
    deadline = time.monotonic() + 90
    while not (out / "checkpoints" / "step-10").is_dir():  # the first checkpoint, then the notice
        assert time.monotonic() < deadline, cluster.job(job)
        time.sleep(0.2)
    cluster.client(["scancel", "--signal=USR1", scope, str(job)])
    fields = cluster.wait_job(job, DONE, 150, restarts=1)
    log = (cluster.root / f"job-{job}.out").read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", (fields, log[-4000:])
    assert "preempted (run 0): requeueing it" in log
    stopped = re.search(r"preempted \(SIGUSR1[^)]*\) at step (\d+): checkpoint \S+ written", log)
    assert stopped and 10 <= int(stopped.group(1)) < 120, log[-4000:]
    assert re.search(rf"restart 1: resuming from step-{stopped.group(1)}", log), log[-4000:]
    assert "Traceback" not in log and "SignalException" not in log
    want, got = _weights(uninterrupted), _weights(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# ------------------------------------------------------------------------------------------ a lost node

@pytest.mark.timeout(240)
def test_a_lost_node_ends_the_job_naming_it_and_the_requeued_rerun_resumes_on_the_node_left(tmp_path):
    """sbatch --nodes=1-2 of the generated script; after the first checkpoint node2 dies (its slurmd and the job's
    processes there, SIGKILL). The ranks on node1 each say in one line that the peer on node2 went away, the job
    leaves RUNNING within SlurmdTimeout (10 s here) plus slack, Slurm requeues it (--requeue), and the rerun,
    given node1 alone, resumes from the newest checkpoint at world size 2 and finishes the run."""
    with _slurm.slurm_cluster(tag=(os.getpid() + 53) % 100000) as c:  # its own: node2 stays down
        out = tmp_path / "run"
        job = c.sbatch(generated_sbatch("--strategy", "ddp", *LONG, "--max-steps", "150", "--output-dir", str(out)),
                       "--nodes=1-2", f"--output={c.root}/job-%j.out", cwd=REPO)
        deadline = time.monotonic() + 90
        while not (out / "checkpoints" / "step-10").is_dir():
            assert time.monotonic() < deadline, c.job(job)
            time.sleep(0.2)
        assert c.job(job)["NodeList"] == "node[1-2]"
        c.kill_node("node2")
        killed = time.monotonic()
        fields = c.wait_job(job, ("PENDING", "REQUEUED", *DONE), 60, restarts=1)
        left_after = time.monotonic() - killed
        fields = c.wait_job(job, DONE, 120, restarts=1)
        log = (c.root / f"job-{job}.out").read_text(errors="replace")
        assert left_after <= 10 + 20, (left_after, fields)
        assert fields["JobState"] == "COMPLETED" and fields["NodeList"] == "node1", (fields, log[-4000:])
        lines = [ln for ln in log.splitlines() if ln.startswith("error: rank ")]
        named = [ln for ln in lines if f"the peer at {c.addr('node2')} (node node2) went away during a collective"
                 in ln]
        assert named and all(" on node1:" in ln for ln in lines), log[-4000:]
        assert "Traceback" not in log and "ChildFailedError" not in log, log[-4000:]
        resumed = re.search(r"restart 1: resuming from step-(\d+)", log)
        assert resumed and int(resumed.group(1)) >= 10, log[-4000:]
        done = summary(out)
        assert done["world_size"] == 2 and done["steps"] == 150
