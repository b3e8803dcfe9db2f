"""Is the drift between --sync-bn trajectories at world 1, 2 and 4 rounding, or a bug? The diagnosis, as runs.

ResNet-18 (small stem) on digits through scripts/train.py, global batch 24, SGD, N steps, losses every step:

  1. world 1 vs world 1 started from the same weights with a 1e-7 relative perturbation (float32): if this pair
     drifts as fast as world 2/4 vs world 1, the gap is float32 rounding amplified by the dynamics (chaos);
  2. world 1 vs 2 vs 4 with --sync-bn, in float32 and in float64 (--dtype float64): if SyncBatchNorm's maths
     is right, float64 keeps the worlds equal to ~1e-10 where float32 drifts past 1e-4;
  3. the same perturbation test in float64, to show float64 is not merely "less chaotic".

Both members of the perturbed pair load their initial weights from a file (--model-arg weights=...), the
unperturbed file holding exactly the weights train.py would build, so the pair differs only by the perturbation.

Usage: .venv/bin/python bench/syncbn_parity.py [--steps 20] [--worlds 1 2 4] [--dtypes float32 float64]
Prints one line of per-step relative gaps per comparison, and the largest gap of each.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

import models
from launcher import seed_everything

BIN = Path(sys.executable).parent
TRAIN = str(REPO / "scripts" / "train.py")
RUN = ["--model", "resnet18", "--data", "digits", "--batch-size", "24", "--log-every", "1", "--optimizer", "sgd",
       "--lr", "0.002", "--no-progress", "--no-tensorboard", "--sync-bn"]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_",
                                                                   "TORCHELASTIC", "ACCELERATE_"))}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    return e


def train(world: int, out: Path, args: list[str]) -> dict[int, float]:
    if world == 1:
        cmd = [sys.executable, TRAIN]
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={world}", TRAIN, "--strategy", "ddp"]
    proc = subprocess.run([*cmd, *RUN, *args, "--output-dir", str(out)], env=env(), capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"error: world {world} failed:\n{proc.stderr[-3000:]}")
    with open(out / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}


def init_weights(path: Path, rel: float) -> Path:
    """The weights train.py builds for this run (seed 0), each tensor times (1 + rel * N(0, 1)), as a .pth."""
    seed_everything(0)
    model = models.build_model("resnet18", num_classes=10, in_channels=1, small_input=True)
    g = torch.Generator().manual_seed(1)
    sd = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and rel:
            v = v * (1 + rel * torch.randn(v.shape, generator=g, dtype=v.dtype))
        sd[k] = v
    torch.save(sd, path)
    return path


def gaps(a: dict[int, float], b: dict[int, float]) -> list[float]:
    return [abs(a[s] - b[s]) / abs(b[s]) for s in sorted(b)]


def show(label: str, g: list[float]) -> None:
    print(f"{label:<44} max {max(g):.1e}  per step: {' '.join(f'{x:.0e}' for x in g)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--perturb", type=float, default=1e-7)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        w0, w1 = init_weights(tmp / "w0.pth", 0.0), init_weights(tmp / "w1.pth", a.perturb)
        for dtype in a.dtypes:
            common = ["--max-steps", str(a.steps), "--dtype", dtype]
            runs = {w: train(w, tmp / f"{dtype}-w{w}", common) for w in a.worlds}
            ref = runs[a.worlds[0]]
            for w in a.worlds[1:]:
                show(f"{dtype}: world {w} vs world {a.worlds[0]} (--sync-bn)", gaps(runs[w], ref))
            same = train(1, tmp / f"{dtype}-file0", [*common, "--model-arg", f"weights={w0}"])
            pert = train(1, tmp / f"{dtype}-file1", [*common, "--model-arg", f"weights={w1}"])
            show(f"{dtype}: world 1 from the file vs built", gaps(same, runs[1]) if 1 in runs else gaps(same, same))
            show(f"{dtype}: world 1, weights x(1+{a.perturb:g}N) vs not", gaps(pert, same))


if __name__ == "__main__":
    main()
