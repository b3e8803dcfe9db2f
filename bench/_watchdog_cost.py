"""The watchdog's cost measured inside one torchrun job: blocks of DDP steps with the watchdog on and off.

    torchrun --standalone --nproc_per_node=2 bench/_watchdog_cost.py OUT.json [BLOCKS] [STEPS] [null]

Every rank runs the same loop as ``training.Trainer`` (ResNet-18 under DDP on digit-sized images, AdamW, the
same ``Watchdog.phase`` marks and ``step_done``), and the ranks switch the watchdog on and off together every
STEPS steps (on, off, off, on, ...: ABBA, so a drift in the machine's load cancels). Rank 0 writes each block's
seconds per step, and in the on blocks the CPU time its watchdog thread used over the block's wall time, to
OUT.json. ``null``: the same alternation, but the watchdog is never started (an A/A control: the spread of the
ratio when nothing differs). Run by bench/hangs.py.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import launcher
import models


def main() -> int:
    out, blocks, steps = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 16, \
        int(sys.argv[3]) if len(sys.argv) > 3 else 20
    null = len(sys.argv) > 4 and sys.argv[4] == "null"
    with launcher.distributed("ddp") as info:
        launcher.seed_everything(0, rank=info.rank)
        model = launcher.strategy_for(info).wrap(models.build_model("resnet18", num_classes=10, in_channels=1,
                                                                    small_input=True))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        wd = launcher.Watchdog(info, report_dir=Path(tempfile.mkdtemp()), timeout_s=None, startup_s=300)
        rows, step = [], 0
        for b in range(blocks + 1):  # block 0 warms up
            on = b > 0 and (b - 1) % 4 in (0, 3)
            if on and not null:
                wd.start()
            launcher.all_reduce_sum(torch.zeros(1), info)  # both ranks start the block together
            t0 = time.perf_counter()
            for _ in range(steps):
                step += 1
                wd.phase("data", step)
                batch = (x.clone(), y.clone())
                wd.phase("forward", step)
                loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
                wd.phase("backward", step)
                loss.backward()
                wd.phase("optimizer", step)
                opt.step()
                opt.zero_grad(set_to_none=True)
                wd.phase("collective", step)
                launcher.all_reduce_sum(loss.detach().reshape(1), info)  # the step boundary's all-reduce
                wd.step_done()
            wall = time.perf_counter() - t0
            cpu_before = wd.thread_cpu_s
            if on and not null:
                wd.stop()
            if b > 0:
                rows.append({"on": on, "s_per_step": wall / steps,
                             "thread_cpu_share": (wd.thread_cpu_s - cpu_before) / wall if on else 0.0})
        if info.is_main:
            out.write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    launcher.run_main(main)
