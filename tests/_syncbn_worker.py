"""Run under torchrun (gloo): launcher.syncbn.SyncBatchNorm over uneven per-rank batches must equal one
nn.BatchNorm2d over the concatenated batch, in forward, backward and running statistics.

Rank 0 prints one JSON list (a report per rank) with the largest differences; the test asserts on them.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.getcwd())
import launcher  # noqa: E402
from launcher.syncbn import convert_sync_batchnorm  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [5, 2, 9, 4][:world]  # unequal shares: statistics must be count-weighted
    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(sum(sizes), 3, 4, 5, generator=g) * 3 + 2
    w_all = torch.randn(sum(sizes), 3, 4, 5, generator=g)  # loss = sum(y * w): a non-trivial dL/dy
    lo = sum(sizes[:rank])
    x_mine, w_mine = x_all[lo:lo + sizes[rank]], w_all[lo:lo + sizes[rank]]

    torch.manual_seed(1)
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    mine = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))
    mine.load_state_dict({"0." + k: v for k, v in ref.state_dict().items()})
    report = {"rank": rank, "type": type(mine[0]).__name__}
    for step in range(3):  # several steps: running statistics and their shift follow along
        xr = x_all.clone().requires_grad_()
        ref.zero_grad()
        y_ref = ref(xr)
        (y_ref * w_all).sum().backward()
        xm = x_mine.clone().requires_grad_()
        mine.zero_grad()
        y = mine(xm)
        (y * w_mine).sum().backward()
        grads = torch.cat([mine[0].weight.grad, mine[0].bias.grad])
        dist.all_reduce(grads)  # what DDP does to parameter gradients (before its 1/W)
        diffs = {
            "y": (y - y_ref[lo:lo + sizes[rank]]).abs().max().item(),
            "dx": (xm.grad - xr.grad[lo:lo + sizes[rank]]).abs().max().item(),
            "dparam": (grads - torch.cat([ref.weight.grad, ref.bias.grad])).abs().max().item(),
            "running_mean": (mine[0].running_mean - ref.running_mean).abs().max().item(),
            "running_var": (mine[0].running_var - ref.running_var).abs().max().item(),
        }
        report[f"step{step}"] = diffs
        x_all = x_all * 1.1 + 0.3
        x_mine = x_all[lo:lo + sizes[rank]]
    mine.eval()
    ref.eval()
    report["eval"] = (mine(x_mine) - ref(x_mine)).abs().max().item()
    reports = [None] * world
    dist.all_gather_object(reports, report)  # one line from rank 0: ranks' prints would interleave
    if rank == 0:
        print(json.dumps(reports), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    launcher.run_main(main, skip_finalization=True)  # raw dist.init_process_group("gloo") above
