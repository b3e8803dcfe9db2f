"""Script-level smoke tests: launch scripts/train.py for real, the way users do, and assert on its files.

Every launch here is a real process (python, torchrun, two torchrun agents, accelerate) with gloo on CPU.
Runs are tiny (a few steps) so the whole file stays within the test budget.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
from conftest import BIN, REPO, child_env, free_port, train_py

TRAIN = str(REPO / "scripts" / "train.py")
pytestmark = pytest.mark.multiproc

MLP_FAST = ["--model", "mlp", "--data", "digits", "--num-samples", "400", "--batch-size", "32",
            "--no-progress", "--no-tensorboard"]


def launch(kind: str, args: list[str], *, nproc: int = 2, expect: int = 0, env: dict | None = None,
           timeout: int = 240) -> subprocess.CompletedProcess:
    if kind == "python":
        proc = train_py(args, timeout=timeout, **(env or {}))
        assert proc.returncode == expect, f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-4000:]}"
        return proc
    if kind == "torchrun":
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", TRAIN]
    elif kind == "accelerate":
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), TRAIN]
        env = {"ACCELERATE_USE_CPU": "1", **(env or {})}
    else:
        raise ValueError(kind)
    proc = subprocess.run(cmd + args, cwd=REPO, env=child_env(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc


def summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    assert list(s) == ["model", "strategy", "world_size", "steps", "final_loss", "eval", "checkpoint"]
    return s


def metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def weights(path) -> dict[str, torch.Tensor]:
    return checkpoint.load_state_dict(path)


# ----------------------------------------------------------------------------------------- launches

def test_single_process_classification_writes_every_output(tmp_path):
    out = tmp_path / "single"
    launch("python", ["--model", "mlp", "--data", "digits", "--num-samples", "400", "--batch-size", "32",
                      "--epochs", "2", "--log-every", "2", "--save-every", "5", "--keep-last", "2",
                      "--output-dir", str(out)])
    s = summary(out)
    assert s["model"] == "mlp" and s["strategy"] == "single" and s["world_size"] == 1
    assert s["steps"] == 2 * (320 // 32)  # 400 samples, 20% held out, global batch 32
    assert set(s["eval"]) == {"accuracy"} and 0.5 < s["eval"]["accuracy"] <= 1.0
    assert s["final_loss"] is not None and s["final_loss"] < 2.3  # below chance-level cross-entropy
    assert Path(s["checkpoint"]).name == "step-20" and (out / "curves.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    rows = metrics(out)
    assert list(rows[0]) == ["step", "epoch", "loss", "lr", "throughput", "grad_norm", "accuracy", "dice", "miou",
                            "ema_accuracy", "ema_dice", "ema_miou",
                            "step_time_min", "step_time_median", "step_time_max", "slowest_rank"]
    timed = [r for r in rows if r["loss"]]  # one process: its own step time is min, median and max; rank 0 slowest
    assert timed and all(r["step_time_min"] == r["step_time_max"] and float(r["step_time_min"]) > 0
                         and r["slowest_rank"] == "0" for r in timed)
    assert [r["step"] for r in rows if r["accuracy"]] == ["10", "20"]  # one evaluation per epoch
    assert all(float(r["throughput"]) > 0 for r in rows if r["loss"])
    mgr = checkpoint.CheckpointManager(out / "checkpoints")
    best = mgr.best_record()["step"]  # the entry with the best accuracy is kept while best
    assert [st for st, _ in mgr.entries()] == sorted({15, 20, best})  # save-every 5, keep-last 2, plus best
    assert mgr.latest() == out / "checkpoints" / "step-20"
    m = checkpoint.read_manifest(mgr.latest())
    assert m["model"] == "mlp" and m["model_options"]["in_features"] == 64 and m["topology"]["strategy"] == "single"
    # re-running into the same directory without --resume would mix two runs: refused
    p = launch("python", MLP_FAST + ["--output-dir", str(out)], expect=2)
    assert "--resume auto" in p.stderr


def write_segfolder(root: Path, n: int = 40) -> Path:
    """A user's segmentation folder (images/ + masks/ PNGs), drawn from the shapes generator."""
    import numpy as np
    from PIL import Image

    from training.data import ShapesDataset

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    ds = ShapesDataset(n, image_size=20, seed=3)
    for i in range(n):
        image, mask = ds[i]
        Image.fromarray((image[0].clamp(0, 1).numpy() * 255).astype(np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask.numpy().astype(np.uint8)).save(root / "masks" / f"s{i}.png")
    return root


def test_dp_unet_on_user_segfolder_with_amp_channels_last_accum_clip(tmp_path):
    out = tmp_path / "unet"
    data = write_segfolder(tmp_path / "seg")
    launch("python", ["--model", "unet", "--model-arg", "base_width=4", "--model-arg", "bilinear=True",
                      "--data", f"segfolder:{data}", "--image-size", "24", "--batch-size", "8", "--max-steps", "4",
                      "--strategy", "dp", "--amp", "bf16", "--channels-last", "--grad-accum", "2",
                      "--clip-grad", "1.0", "--optimizer", "sgd", "--lr", "0.05", "--no-tensorboard",
                      "--no-progress", "--output-dir", str(out)])
    s = summary(out)
    assert s["model"] == "unet" and s["strategy"] == "dp" and s["steps"] == 4
    assert set(s["eval"]) == {"dice", "miou"} and all(0 <= v <= 1 for v in s["eval"].values())
    assert checkpoint.read_manifest(s["checkpoint"])["model_options"]["num_classes"] == 4  # from the masks
    # DataParallel (on CPU it runs the module directly) still saved bare, canonical keys
    keys = weights(s["checkpoint"])
    assert keys and not any(k.startswith("module.") for k in keys)
    assert checkpoint.read_manifest(s["checkpoint"])["topology"]["strategy"] == "dp"


def test_torchrun_ddp_resnet_variants_then_single_process_eval_gives_same_accuracy(tmp_path):
    out = tmp_path / "ddp"
    launch("torchrun", ["--model", "resnet18", "--model-arg", "extra_inputs=1", "--model-arg", "aux_output=True",
                        "--model-arg", "head='mlp'", "--data", "digits", "--num-samples", "300", "--batch-size", "16",
                        "--max-steps", "6", "--save-every", "3", "--strategy", "ddp", "--no-tensorboard",
                        "--no-progress", "--output-dir", str(out)])
    s = summary(out)
    assert s["strategy"] == "ddp" and s["world_size"] == 2 and s["steps"] == 6
    m = checkpoint.read_manifest(s["checkpoint"])
    assert m["topology"] == {**m["topology"], "strategy": "ddp", "world_size": 2, "launcher": "torchrun"}
    assert m["model_options"]["extra_inputs"] == 1 and m["model_options"]["head"] == "mlp"
    assert "fc.fc1.weight" in weights(s["checkpoint"])
    # A different topology (one process, no --model: taken from the manifest) evaluates the same checkpoint
    ev = tmp_path / "eval"
    launch("python", ["--eval-only", "--resume", s["checkpoint"], "--data", "digits", "--num-samples", "300",
                      "--no-progress", "--output-dir", str(ev)])
    e = summary(ev)
    assert e["steps"] == 0 and e["checkpoint"] == s["checkpoint"] and e["final_loss"] is None
    assert e["eval"]["accuracy"] == s["eval"]["accuracy"]  # exact aggregation, no double-counted padding


def test_resume_across_world_sizes_continues_the_same_run(tmp_path):
    """single 4 steps -> torchrun ddp x2 resumes to 8 -> equals 8 uninterrupted single-process steps.

    The MLP has no batch statistics, so with the global batch fixed the DDP-averaged gradient equals the
    single-process one up to float rounding: the resumed weights match the straight run closely.
    """
    straight, first = tmp_path / "straight", tmp_path / "first"
    common = MLP_FAST + ["--epochs", "1", "--lr", "0.01", "--warmup-steps", "2"]
    launch("python", common + ["--max-steps", "8", "--output-dir", str(straight)])
    launch("python", common + ["--max-steps", "8", "--save-every", "4", "--output-dir", str(first)])
    step4 = first / "checkpoints" / "step-4"
    second = tmp_path / "second"
    launch("torchrun", common + ["--max-steps", "8", "--strategy", "ddp", "--resume", str(step4),
                                 "--output-dir", str(second)])
    s = summary(second)
    assert s["steps"] == 8 and s["world_size"] == 2
    assert [r["step"] for r in metrics(second) if r["loss"]][0] != "2"  # no step before the cursor re-run
    a, b = weights(straight / "checkpoints" / "step-8"), weights(s["checkpoint"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # and the reverse: the ddp checkpoint resumes in a single process (auto finds it in its own run dir),
    # switching to fp16 autocast: the checkpoint has no GradScaler state, which starts fresh (not an error)
    p = launch("python", common + ["--max-steps", "10", "--resume", "auto", "--amp", "fp16",
                                   "--output-dir", str(second)])
    assert "no scaler state" in p.stderr
    s2 = summary(second)
    assert s2["steps"] == 10 and s2["world_size"] == 1
    assert checkpoint.read_manifest(s2["checkpoint"])["step"] == 10


def test_two_torchrun_agents_as_two_nodes(tmp_path):
    out, port = tmp_path / "nodes", free_port()
    procs = []
    for node in (0, 1):
        cmd = [str(BIN / "torchrun"), "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
               "--master_addr=127.0.0.1", f"--master_port={port}", TRAIN, *MLP_FAST, "--max-steps", "3",
               "--strategy", "ddp", "--output-dir", str(out)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    s = summary(out)
    assert s["world_size"] == 2 and s["steps"] == 3
    assert checkpoint.read_manifest(s["checkpoint"])["topology"]["world_size"] == 2


def test_accelerate_launch_on_cpu_two_processes(tmp_path):
    out = tmp_path / "acc"
    launch("accelerate", MLP_FAST + ["--max-steps", "3", "--strategy", "ddp", "--output-dir", str(out)])
    s = summary(out)
    assert s["world_size"] == 2 and s["strategy"] == "ddp"
    assert checkpoint.read_manifest(s["checkpoint"])["topology"]["launcher"] == "accelerate"


# ------------------------------------------------------------------------------------ refused traps

def test_world_size_above_one_with_single_strategy_is_refused(tmp_path):
    p = launch("torchrun", MLP_FAST + ["--strategy", "single", "--output-dir", str(tmp_path / "x")], expect=1)
    # torchrun reports the children's exit code 2 as its own failure; the child's one line names the fix
    assert "error:" in p.stderr and "--strategy ddp" in p.stderr and "exitcode  : 2" in p.stderr


def test_accelerate_cpu_flag_starting_one_process_is_refused(tmp_path):
    cmd = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", TRAIN, *MLP_FAST, "--strategy", "ddp",
           "--output-dir", str(tmp_path / "x")]
    p = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "error:" in p.stderr and "--multi_gpu" in p.stderr
    assert f'File "{TRAIN}"' not in p.stderr  # accelerate prints its own traceback for the exit 2; ours has none
    assert not (tmp_path / "x" / "summary.json").exists()


@pytest.mark.parametrize("args,needle", [
    (["--model", "nope"], "unknown model"),
    (["--model", "mlp", "--data", "nope"], "unknown dataset"),
    (["--model", "mlp", "--model-arg", "style=weird"], "style"),
    (["--model", "unet"], "segmentation"),
    (["--model", "mlp", "--resume", "/nonexistent/ckpt"], "no such file"),
    (["--model", "mlp", "--batch-size", "5000"], "exceeds"),
    (["--model", "mlp", "--eval-only"], "--resume"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, needle):
    data = [] if "--data" in args else ["--data", "digits"]
    p = train_py([*args, *data, "--output-dir", str(tmp_path / "o"), "--no-progress"], timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and needle in lines[-1] and "Traceback" not in p.stderr
