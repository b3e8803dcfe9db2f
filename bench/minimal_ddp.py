"""The minimal torchrun + DDP training loop: the baseline that bench/ddp_step.py compares scripts/train.py with.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 bench/minimal_ddp.py \\
        --model resnet18 --data digits --batch-size 64 --steps 22

What a user would write by hand: ``init_process_group("gloo")`` from torchrun's environment, the same
model as ours (the ``models`` registry with the options scripts/train.py derives for the data: classes,
channels, ``small_input`` for images <= 64 px), the same data (``scripts/data.build_datasets``),
``DistributedSampler(drop_last=True)``, ``DataLoader(batch_size=global_batch // world)``, ``DDP``,
``AdamW(lr)`` and a warmup-cosine ``LambdaLR``. Each iteration (fetch the batch, move it, zero_grad,
forward, loss, backward, step, scheduler step) is timed with ``time.perf_counter`` from the end of the
previous one; rank 0 prints one JSON line ``{"step_s": [...], ...}``. No evaluation, no checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import models
from training import data


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--data", default="digits")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64, help="GLOBAL batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=22)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        train_ds, _, info = data.build_datasets(args.data, seed=args.seed, image_size=args.image_size)
        torch.manual_seed(args.seed)
        model = models.build_model(args.model, num_classes=info.num_classes, in_channels=info.in_channels,
                                   small_input=bool(info.image_size and info.image_size <= 64))
        model = DDP(model)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        total, warm = args.steps, max(1, args.steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm)))))
        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
        loader = DataLoader(train_ds, batch_size=args.batch_size // world, sampler=sampler, drop_last=True)
        model.train()
        step_s: list[float] = []
        step, epoch = 0, 0
        t_prev = time.perf_counter()
        while step < total:
            sampler.set_epoch(epoch)
            for x, y in loader:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                sched.step()
                now = time.perf_counter()
                step_s.append(now - t_prev)
                t_prev = now
                step += 1
                if step == total:
                    break
            epoch += 1
        if rank == 0:
            print(json.dumps({"script": "minimal_ddp", "world_size": world, "steps": step,
                              "steps_per_epoch": len(loader), "threads": torch.get_num_threads(),
                              "final_loss": float(loss), "step_s": step_s}), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
