"""torchrun worker for tests/test_faults.py: two agents whose restart counts end up different.

Node "a"'s worker fails in the first round (its agent counts a restart); node "b"'s worker stays healthy and
idle, so its agent joins the next round WITHOUT counting one (a membership change). In that round the ranks
see TORCHELASTIC_RESTART_COUNT 1 and 0, and must still form the group on one attempt prefix.
"""
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import launcher

node, mark = os.environ["ANYTOPO_TEST_NODE"], Path(os.environ["ANYTOPO_TEST_MARK"])
info = launcher.setup("ddp", timeout_s=30)
x = torch.ones(1)
dist.all_reduce(x)
count = os.environ["TORCHELASTIC_RESTART_COUNT"]
first_round = not mark.exists()
print(f"node {node} count {count} restart {info.restart} rank {info.rank} formed the group: {x.item():g}", flush=True)
if first_round:
    if node == "a":
        time.sleep(2.0)  # node b is idle by now
        mark.write_text("a failed")
        os._exit(1)
    time.sleep(120)  # healthy and idle: its agent stops it for the next round
    sys.exit(0)
for _ in range(5):
    dist.all_reduce(x)
dist.barrier()
launcher.teardown()
