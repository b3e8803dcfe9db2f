"""Asynchronous saves from CUDA state, for bench/gpu_check.sh: pinned snapshot buffers, exactness, stall.

    python bench/_async_pinned_check.py --out DIR [--device cuda] [--model resnet50] [--saves 3]

A model on ``--device`` trained by AdamW; at each of ``--saves`` states, a synchronous save (the reference)
and then an asynchronous one (``CheckpointManager(async_save=True, overlap_snapshot=True)``, train.py's
default), right after which a real optimizer step changes every weight and moment. Checked, each a FAIL:
- the async entry's weights and AdamW state equal the reference entry's bit for bit (the snapshot was taken
  at ``save()``, not after the next step);
- on CUDA every snapshot buffer is pinned (page-locked: the device-to-host copy is a DMA), and no buffer is
  allocated after the first save (they are reused).
Measured (informational): what ``save()`` blocks the training thread for (async) against a synchronous save
and against a bare ``state_dict`` copy to pageable CPU memory, medians over the saves but the first.
Prints one JSON line (also written to DIR/async_pinned.json); exit 0 when every check holds. Runs on CPU
too (``--device cpu``: nothing is pinned there and the pin check says so), which is how it is tested.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import models
from checkpoint import CheckpointManager, OptimizerState


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, opt, inputs, device) -> None:
    out = model(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    out.float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)


def restored(entry: Path, name: str, options: dict) -> tuple[dict, dict]:
    """The entry's model weights and optimizer state, loaded on CPU."""
    model = models.build_model(name, **options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    CheckpointManager(entry.parent).restore(entry, {"model": model, "optimizer": OptimizerState(model, opt)})
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
             for i, st in enumerate(opt.state[p] for p in model.parameters())})


def differences(a: dict, b: dict, what: str) -> list[str]:
    bad = []
    if a.keys() != b.keys():
        return [f"{what}: keys differ"]
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            bad += differences(x, y, f"{what}[{k}]")
        elif torch.is_tensor(x):
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                bad.append(f"{what}[{k}]")
        elif x != y:
            bad.append(f"{what}[{k}]")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--saves", type=int, default=3)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    options = {"num_classes": 10}
    torch.manual_seed(0)
    model = models.build_model(args.model, **options).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = tuple(x.to(device) for x in models.example_inputs(args.model, args.batch_size,
                                                                 image_size=args.image_size, **options))
    train_step(model, opt, inputs, device)  # AdamW moments exist

    ref_mgr = CheckpointManager(args.out / "sync", keep_last=None)
    mgr = CheckpointManager(args.out / "async", keep_last=None, async_save=True, overlap_snapshot=True)
    components = {"model": model, "optimizer": OptimizerState(model, opt)}
    stall, sync_ms, copy_ms, allocated, failures = [], [], [], [], []
    for i in range(args.saves):
        step = i + 1
        sync(device)
        t0 = time.perf_counter()
        {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        copy_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        ref_mgr.save(step, components)
        sync_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        mgr.save(step, components)
        stall.append((time.perf_counter() - t0) * 1e3)
        train_step(model, opt, inputs, device)  # changes every weight and moment while the write runs
        err = mgr.wait()
        if err:
            failures.append(f"save {step}: {err}")
            break
        allocated.append(mgr._background.model_pool.allocated + mgr._background.state_pool.allocated)
        ref_w, ref_o = restored(ref_mgr.directory / f"step-{step}", args.model, options)
        got_w, got_o = restored(mgr.directory / f"step-{step}", args.model, options)
        failures += [f"save {step}: {d} differs from the sync save" for d in
                     differences(ref_w, got_w, "weights") + differences(ref_o, got_o, "optimizer")]
    mgr.flush()

    # (buffer, whether its source is a CUDA tensor): AdamW's 'step' counters live on the CPU (not pinned)
    bufs = [(b, from_cuda) for pool in (mgr._background.model_pool, mgr._background.state_pool)
            for b, from_cuda in pool._buffers]
    cuda_bufs = [b for b, from_cuda in bufs if from_cuda and b.numel()]
    pinned = sum(1 for b in cuda_bufs if b.is_pinned())
    if device.type == "cuda" and (not cuda_bufs or pinned != len(cuda_bufs)):
        failures.append(f"{len(cuda_bufs) - pinned} of {len(cuda_bufs)} snapshot buffers of CUDA tensors are not pinned")
    if len(set(allocated)) > 1:
        failures.append(f"buffers allocated after the first save: {allocated}")
    med = (lambda xs: statistics.median(xs[1:] if len(xs) > 1 else xs)) if stall else (lambda xs: float("nan"))
    n_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    result = {"device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
              "model": args.model, "model_mb": round(n_bytes / 1e6, 1), "saves": args.saves,
              "snapshot_buffers": len(bufs), "from_cuda": len(cuda_bufs),
              "pinned": pinned if device.type == "cuda" else "n/a (cpu)",
              "buffers_allocated_after_each_save": allocated,
              "async_save_blocks_ms": round(med(stall), 2), "sync_save_ms": round(med(sync_ms), 2),
              "state_dict_to_pageable_cpu_ms": round(med(copy_ms), 2),
              "stall_vs_sync": round(med(stall) / med(sync_ms), 4) if sync_ms else None,
              "exact": not failures, "failures": failures}
    line = json.dumps(result)
    print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "async_pinned.json").write_text(line + "\n")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
