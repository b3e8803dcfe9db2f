"""Worker for real multi-process checkpoint tests (launched by torchrun with gloo).

save MODE: every rank trains one DDP step on its own shard, then `checkpoint.save(ddp_model, path)`
           (rank 0 writes, all wait) and a CheckpointManager entry; rank 0 writes its output on a fixed input.
load MODE: every rank loads PATH into a DDP-wrapped model and writes its output on the fixed input.
"""
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

import checkpoint
import launcher


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def fixed_input() -> torch.Tensor:
    return torch.linspace(-1, 1, 4 * 6).reshape(4, 6)


def main() -> int:
    mode, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        model = nn.parallel.DistributedDataParallel(make_model())
        if mode == "save":
            opt = torch.optim.AdamW(model.parameters(), lr=0.05)
            g = torch.Generator().manual_seed(100 + rank)
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            checkpoint.save(model, path, metadata={"model": "toy", "step": 1})
            mgr = checkpoint.CheckpointManager(path + "-mgr", keep_last=2)
            mgr.save(1, {"model": model, "optimizer": checkpoint.OptimizerState(model, opt), "trainer": {"epoch": 0}})
        else:
            report = checkpoint.load(path, model)
            assert report.ok, str(report)
        model.eval()
        with torch.no_grad():
            y = model(fixed_input())
        with open(f"{out}.rank{rank}.json", "w") as f:
            json.dump({"rank": rank, "world": world, "out": y.tolist()}, f)
        dist.barrier()  # no rank tears down while its peer still sends
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    launcher.run_main(main, skip_finalization=True)  # raw dist.init_process_group("gloo") above
