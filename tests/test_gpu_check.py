"""bench/gpu_check.sh and its helpers, on CPU: the script parses and plans every step, and the async-pinned
check (bench/_async_pinned_check.py) really compares an async entry with a sync one (so a GPU session spends
its minutes on the GPU, not on a broken script)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, child_env


def test_gpu_check_dry_run_plans_every_step():
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                         text=True, timeout=120, env=child_env(PYTHON=sys.executable))
    assert out.returncode == 0, out.stderr
    for step in ("ddp-nccl-world1", "dp-1gpu", "amp-bf16", "amp-fp16", "channels-last", "cuda-to-cpu",
                 "fsdp2-cuda", "syncbn-cuda", "async-pinned", "train-loop-r50"):
        assert f"DRY {step}" in out.stdout, step
    only = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--only=async-pinned"],
                          capture_output=True, text=True, timeout=120, env=child_env(PYTHON=sys.executable))
    assert "DRY async-pinned" in only.stdout and "DRY fsdp2-cuda" not in only.stdout


def test_async_pinned_check_on_cpu_finds_entries_equal(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "_async_pinned_check.py"), "--device", "cpu",
                          "--model", "resnet18", "--image-size", "16", "--batch-size", "4", "--saves", "2",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env=child_env(PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.loads((tmp_path / "async_pinned.json").read_text())
    assert r["exact"] and not r["failures"], r
    assert r["buffers_allocated_after_each_save"][0] == r["buffers_allocated_after_each_save"][-1] > 0
    # the entries it compared exist and are two different saves
    assert (tmp_path / "async" / "step-2").is_dir() and (tmp_path / "sync" / "step-2").is_dir()
