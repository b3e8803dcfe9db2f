"""Worker for tests/test_launcher_multiproc.py, started by torchrun / accelerate launch.

Sets up with ``launcher.distributed``, sums a tensor over ranks, takes one DDP step on a tiny model and
writes ``rank-<R>.json`` into ``--out``. A LaunchError is handled the way entry scripts should: one
``error: ...`` line on stderr, an ``error-<pid>.json`` for the test, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

import launcher


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--no-step", action="store_true",
                   help="skip the DDP step (building DDP imports torch._dynamo: ~4 s of CPU per process)")
    return p


def step(info: launcher.DistInfo) -> dict:
    torch.manual_seed(100 + info.rank)  # a different init per rank: DDP must broadcast rank 0's
    model = nn.Linear(3, 1)
    local_init = [p.detach().flatten().tolist() for p in model.parameters()]
    net = launcher.wrap_model(model, info)
    synced = [p.detach().flatten().tolist() for p in model.parameters()]
    x = torch.full((4, 3), float(info.rank + 1))  # different data per rank: DDP must average gradients
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(x).pow(2).mean().backward()
    opt.step()
    return {
        "wrapper": type(net).__name__,
        "local_init": local_init,
        "synced": synced,
        "after": [p.detach().flatten().tolist() for p in model.parameters()],
    }


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        with launcher.distributed(args.strategy, timeout_s=60) as info:
            log = launcher.get_logger(info)
            log.info("worker up")
            record = {
                "rank": info.rank, "local_rank": info.local_rank, "world_size": info.world_size,
                "local_world_size": info.local_world_size, "node_rank": info.node_rank,
                "device": str(info.device), "backend": info.backend, "launcher": info.launcher,
                "strategy": info.strategy, "is_main": info.is_main, "distributed": info.distributed,
                "sum": launcher.all_reduce_sum(torch.tensor([info.rank + 1.0]), info).item(),
                "train_indices": list(launcher.TrainSampler(10, info, seed=0)),
                "eval_indices": list(launcher.EvalSampler(7, info)),
                **({} if args.no_step else step(info)),
            }
    except launcher.LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        (args.out / f"error-{os.getpid()}.json").write_text(json.dumps({"error": str(e)}))
        return e.exit_code
    (args.out / f"rank-{info.rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    launcher.run_main(main)
