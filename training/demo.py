"""The main job on shipped data (``make demo``), about 3 minutes on a 2-core CPU:

0. the model table: every registered model built with its defaults (name, parameters, input -> output);
1. ResNet-18 (1-channel, small stem) trained with DDP over 2 processes (torchrun, gloo) on the real
   8x8 digits that ship with scikit-learn;
2. its checkpoint evaluated by ONE process (another topology): the accuracy must be identical;
3. a U-Net trained on the synthetic ``shapes`` segmentation set.

Prints where the checkpoints, curves.png and summary.json are, and exits non-zero when a target is
missed (accuracy >= 0.90, identical accuracy on the other topology, Dice >= 0.85).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "train.py"  # the command line a user types, run as one would
BIN = Path(sys.executable).parent


def run(title: str, cmd: list[str]) -> float:
    print(f"\n=== {title}\n$ {' '.join(str(c) for c in cmd)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t = time.perf_counter()
    subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, check=True)
    return time.perf_counter() - t


def model_table() -> None:
    """One line per registered model: name, parameter count, example input -> output shape."""
    import torch

    import models

    print("=== registered models (default options)")
    for name in models.list_models():
        # on the meta device: real shapes and counts, no memory or init cost
        with torch.device("meta"):
            model = models.build_model(name).eval()
            inputs = tuple(x.to("meta") for x in models.example_inputs(name))
            with torch.no_grad():
                out = model(*inputs)
        params = sum(p.numel() for p in model.parameters())
        shapes = " + ".join(str(tuple(x.shape)) for x in inputs)
        print(f"  {name:<10} {params:>12,} params  {shapes} -> {tuple(out.shape)}", flush=True)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default=str(REPO / "demo-output"))
    p.add_argument("--epochs", type=int, default=3, help="ResNet-18 epochs")
    p.add_argument("--unet-steps", type=int, default=150)
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    shutil.rmtree(out, ignore_errors=True)  # the demo is a fresh run each time
    resnet, evaluated, unet = out / "resnet18-ddp", out / "resnet18-eval-1proc", out / "unet-shapes"
    times = {}
    t = time.perf_counter()
    model_table()
    times["models"] = time.perf_counter() - t
    try:
        times["resnet"] = run(
            "ResNet-18 on digits, DDP x2 (torchrun, gloo)",
            [BIN / "torchrun", "--standalone", "--nproc_per_node=2", TRAIN,
             "--strategy", "ddp", "--model", "resnet18", "--data", "digits", "--epochs", args.epochs,
             "--batch-size", "64", "--lr", "3e-3", "--save-every", "20", "--output-dir", resnet])
        ckpt = summary(resnet)["checkpoint"]
        times["eval"] = run("the DDP checkpoint evaluated by one process",
                            [sys.executable, TRAIN, "--eval-only", "--resume", ckpt, "--data", "digits",
                             "--output-dir", evaluated, "--no-progress"])
        times["unet"] = run(
            "U-Net on shapes (single process)",
            [sys.executable, TRAIN, "--model", "unet", "--model-arg", "base_width=16", "--data", "shapes:1200",
             "--image-size", "32", "--batch-size", "32", "--lr", "3e-3", "--epochs", "100",
             "--max-steps", args.unet_steps, "--output-dir", unet])
    except subprocess.CalledProcessError as e:
        print(f"error: demo step failed with exit code {e.returncode}; its output is above", file=sys.stderr)
        return 1
    r, e, u = summary(resnet), summary(evaluated), summary(unet)
    checks = [
        ("ResNet-18 DDP x2 test accuracy >= 0.90", r["eval"]["accuracy"] >= 0.90, f"{r['eval']['accuracy']:.4f}"),
        ("same accuracy evaluated by 1 process", e["eval"]["accuracy"] == r["eval"]["accuracy"],
         f"{e['eval']['accuracy']:.4f}"),
        ("U-Net Dice >= 0.85", u["eval"]["dice"] >= 0.85, f"dice {u['eval']['dice']:.4f}, mIoU {u['eval']['miou']:.4f}"),
    ]
    print("\n=== anytopo demo results")
    for name, ok, value in checks:
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {value}")
    for label, d in (("resnet18 (ddp x2)", resnet), ("resnet18 eval (1 proc)", evaluated), ("unet", unet)):
        s = summary(d)
        print(f"  {label}:\n    checkpoint   {s['checkpoint']}\n    summary.json {d / 'summary.json'}"
              + (f"\n    curves.png   {d / 'curves.png'}" if (d / "curves.png").exists() else ""))
    print("  times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f", total {sum(times.values()):.0f}s")
    print("  try: .venv/bin/anytopo-ckpt inspect " + r["checkpoint"])
    return 0 if all(ok for _, ok, _ in checks) else 1
