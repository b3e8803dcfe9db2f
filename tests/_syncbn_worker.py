"""Run under torchrun (gloo): launcher.syncbn.SyncBatchNorm over uneven per-rank batches must equal one
nn.BatchNorm2d over the concatenated batch, in forward, backward and running statistics.

Rank 0 prints one JSON list (a report per rank) with the largest differences; the test asserts on them.
"""
from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch import nn

import launcher
from launcher.syncbn import convert_sync_batchnorm


def rel_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| relative to the largest |b| of the tensor."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def resnet_step(rank: int, world: int) -> dict[str, float]:
    """One DDP step of ResNet-18 (small stem) with SyncBatchNorm on an equal share of a global batch of 24, in
    float64, against the same model with plain BatchNorm on the whole batch in this process: the parameter
    gradients (after DDP's averaging), the running statistics and the eval logits. float64 makes a wrong
    formula (a missing term in the backward, the variance over the local count, a 1/W too many) stand out
    from summation-order rounding by ten orders of magnitude."""
    import models
    from torch.nn.parallel import DistributedDataParallel

    def build() -> nn.Module:
        torch.manual_seed(0)
        return models.build_model("resnet18", num_classes=10, in_channels=1, small_input=True).double()

    ref, mine = build(), DistributedDataParallel(convert_sync_batchnorm(build()))
    plain = DistributedDataParallel(build())  # the control: per-rank BatchNorm statistics
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (24,), generator=g)
    share = 24 // world
    lo = rank * share
    nn.functional.cross_entropy(ref(x), y).backward()
    nn.functional.cross_entropy(mine(x[lo:lo + share]), y[lo:lo + share]).backward()  # DDP averages over ranks
    nn.functional.cross_entropy(plain(x[lo:lo + share]), y[lo:lo + share]).backward()
    plain_grad = max(rel_gap(p.grad, q.grad) for p, q in zip(plain.module.parameters(), ref.parameters()))
    bare = mine.module
    grads = max(rel_gap(p.grad, q.grad) for p, q in zip(bare.parameters(), ref.parameters()))
    buffers = max(rel_gap(p.double(), q.double()) for (k, p), (_, q) in zip(bare.state_dict().items(),
                                                                             ref.state_dict().items())
                  if "running" in k)
    bare.eval()
    ref.eval()
    with torch.no_grad():
        logits = rel_gap(bare(x), ref(x))
    return {"grad": grads, "running": buffers, "eval": logits, "plain_grad": plain_grad}


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
    report["resnet"] = resnet_step(rank, world)
    reports = [None] * world
    dist.all_gather_object(reports, report)  # one line from rank 0: ranks' prints would interleave
    if rank == 0:
        print(json.dumps(reports), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    launcher.run_main(main, skip_finalization=True)  # raw dist.init_process_group("gloo") above
