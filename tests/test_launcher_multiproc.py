"""launcher across real processes: torchrun (one node and two), accelerate launch, and the refused launches.

Each test starts real processes running tests/_launcher_worker.py and asserts on the JSON every rank
writes and on the launcher's exit status and stderr.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, child_env, free_port

pytestmark = pytest.mark.multiproc

WORKER = str(Path(__file__).with_name("_launcher_worker.py"))
TIMEOUT = 120


def _launch(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]


def _errors(out: Path) -> list[str]:
    return [json.loads(p.read_text())["error"] for p in sorted(out.glob("error-*.json"))]


def _accelerate_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # HF_HOME in tmp: no user-level accelerate default_config.yaml can change the launch.
    return child_env(HF_HOME=str(tmp_path / "hf"), **extra)


def _expected_after(synced: list[list[float]], world: int, lr: float = 0.1) -> torch.Tensor:
    """Parameters after one SGD step on gradients averaged over ranks (the worker's data: x = rank + 1)."""
    w0, b0 = torch.tensor(synced[0]), torch.tensor(synced[1])
    grads = []
    for r in range(world):
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        x = torch.full((4, 3), float(r + 1))
        (x @ w + b).pow(2).mean().backward()
        grads.append(torch.cat([w.grad, b.grad]))
    return torch.cat([w0, b0]) - lr * torch.stack(grads).mean(0)


def _assert_world_of_two(recs: list[dict], launcher_name: str, *, stepped: bool = True) -> None:
    assert [r["rank"] for r in recs] == [0, 1]
    assert all(r["world_size"] == 2 and r["distributed"] and r["backend"] == "gloo" for r in recs)
    assert all(r["launcher"] == launcher_name for r in recs)
    assert [r["sum"] for r in recs] == [3.0, 3.0]  # (0+1) + (1+1) on both ranks
    # shards of both samplers: disjoint, and together the whole (truncated) epoch / the whole eval set
    assert sorted(recs[0]["train_indices"] + recs[1]["train_indices"]) == list(range(10))
    assert sorted(recs[0]["eval_indices"] + recs[1]["eval_indices"]) == list(range(7))
    if not stepped:
        return
    assert all(r["wrapper"] == "DistributedDataParallel" for r in recs)
    # DDP broadcast rank 0's init, then averaged the two ranks' different gradients
    assert recs[0]["local_init"] != recs[1]["local_init"]
    assert recs[1]["synced"] == recs[0]["local_init"]
    expected = _expected_after(recs[0]["synced"], world=2)
    for r in recs:
        assert torch.allclose(torch.tensor(sum(r["after"], [])), expected, atol=1e-6)


def test_torchrun_one_node_two_processes(tmp_path: Path, bin_dir: Path) -> None:
    port = free_port()
    proc = _launch([str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node=2",
                    f"--rdzv_endpoint=127.0.0.1:{port}", WORKER, "--out", str(tmp_path)], child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(tmp_path)
    _assert_world_of_two(recs, "torchrun")
    assert [(r["local_rank"], r["local_world_size"], r["node_rank"]) for r in recs] == [(0, 2, 0), (1, 2, 0)]
    assert [r["is_main"] for r in recs] == [True, False]
    assert "[rank 0/2]" in proc.stderr and "worker up" in proc.stderr
    assert "[rank 1/2]" not in proc.stderr  # rank 1 logs warnings only


def test_torchrun_two_nodes_on_localhost(tmp_path: Path, bin_dir: Path) -> None:
    port = free_port()
    cmd = [str(bin_dir / "torchrun"), "--nnodes=2", "--nproc_per_node=1", "--master_addr=127.0.0.1",
           f"--master_port={port}"]
    agents = [subprocess.Popen([*cmd, f"--node_rank={n}", WORKER, "--out", str(tmp_path)], cwd=REPO,
                               env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for n in (0, 1)]
    try:
        results = [a.communicate(timeout=TIMEOUT) for a in agents]
    finally:
        for a in agents:
            a.kill()
    assert [a.returncode for a in agents] == [0, 0], [err[-2000:] for _, err in results]
    recs = _records(tmp_path)
    _assert_world_of_two(recs, "torchrun")
    assert [(r["node_rank"], r["local_rank"], r["local_world_size"]) for r in recs] == [(0, 0, 1), (1, 0, 1)]


def test_accelerate_multi_gpu_with_use_cpu(tmp_path: Path, bin_dir: Path) -> None:
    proc = _launch([str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(free_port()), WORKER, "--out", str(tmp_path), "--no-step"],
                   _accelerate_env(tmp_path, ACCELERATE_USE_CPU="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(tmp_path)
    _assert_world_of_two(recs, "accelerate", stepped=False)
    assert all(r["device"] == "cpu" for r in recs)


def test_accelerate_multi_gpu_without_use_cpu_is_not_fooled(tmp_path: Path, bin_dir: Path) -> None:
    # On a CPU machine each process's Accelerator() would believe it is alone; the env still says world 2.
    proc = _launch([str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(free_port()), WORKER, "--out", str(tmp_path), "--no-step"],
                   _accelerate_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_world_of_two(_records(tmp_path), "accelerate", stepped=False)


def test_accelerate_cpu_num_processes_is_refused(tmp_path: Path, bin_dir: Path) -> None:
    # accelerate's simple launcher starts ONE process for `--cpu --num_processes 2`.
    proc = _launch([str(bin_dir / "accelerate"), "launch", "--cpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    WORKER, "--out", str(tmp_path)], _accelerate_env(tmp_path))
    assert proc.returncode != 0
    assert "returned non-zero exit status 2" in proc.stderr  # accelerate reports the worker's status
    [err] = _errors(tmp_path)  # one process was started, and it refused
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --num_machines 1" in err
    assert f"error: {err}" in proc.stderr
    assert not _records(tmp_path)


def test_torchrun_with_strategy_single_is_refused(tmp_path: Path, bin_dir: Path) -> None:
    proc = _launch([str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node=2",
                    f"--rdzv_endpoint=127.0.0.1:{free_port()}", WORKER, "--strategy", "single",
                    "--out", str(tmp_path)], child_env())
    assert proc.returncode != 0
    assert "exitcode  : 2" in proc.stderr  # torchrun's failure summary names the worker's status
    errs = _errors(tmp_path)
    assert errs and all("use --strategy ddp" in e for e in errs)
    assert "launcher/dist.py" not in proc.stderr  # the worker printed no traceback, only the error line
    assert not _records(tmp_path)
