"""FSDP2 under SLURM's environment: ranks started the way ``srun`` starts them (SLURM_* variables plus the
exported MASTER_ADDR/MASTER_PORT, no torchrun), training the same trajectory as one process."""
from __future__ import annotations

import subprocess
import sys

import pytest

import checkpoint
from conftest import REPO, child_env, free_port
from test_fsdp import MLP, TRAIN, losses, train

pytestmark = pytest.mark.multiproc


def srun(args: list[str], world: int, timeout: int = 240) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = child_env(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_NTASKS=str(world), SLURM_PROCID=str(rank),
                        SLURM_LOCALID=str(rank), SLURM_NODEID="0", SLURM_NNODES="1",
                        SLURM_NTASKS_PER_NODE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, TRAIN, *MLP, *args], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


@pytest.mark.timeout(360)
def test_fsdp_x2_started_by_srun_follows_the_one_process_run(tmp_path):
    train("python", tmp_path / "straight", "--max-steps", "4")
    straight = losses(tmp_path / "straight")
    run = tmp_path / "slurm"
    procs = srun(["--strategy", "fsdp", "--output-dir", str(run), "--max-steps", "4"], world=2)
    for rank, p in enumerate(procs):
        assert p.returncode == 0, (rank, p.stderr[-3000:])
    got = losses(run)
    assert sorted(got) == sorted(straight) == [1, 2, 3, 4]
    for s in straight:
        assert got[s] == pytest.approx(straight[s], rel=1e-5), (s, got[s], straight[s])
    topology = checkpoint.read_manifest(run / "checkpoints" / "step-4")["topology"]
    assert (topology["strategy"], topology["world_size"], topology["launcher"]) == ("fsdp", 2, "slurm")
