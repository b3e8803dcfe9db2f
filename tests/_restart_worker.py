"""torchrun worker for tests/test_faults.py: forms the group with launcher.setup; in attempt 0 rank 1 SIGKILLs
itself after one all-reduce, so torchrun restarts the group into the store that still holds attempt 0's keys."""
import os
import signal
import time

import torch
import torch.distributed as dist

import launcher

attempt = launcher.restart_attempt()
if attempt == 1 and os.environ["RANK"] == "0":
    time.sleep(1.0)  # rank 1 reaches the store first: without per-attempt keys it reads rank 0's dead address
launcher.setup("ddp", timeout_s=60)
x = torch.ones(1)
dist.all_reduce(x)
print(f"attempt {attempt} rank {dist.get_rank()} formed the group: {x.item():g}", flush=True)
if attempt == 0 and dist.get_rank() == 1:
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGKILL)
for _ in range(10):
    dist.all_reduce(x)
    time.sleep(0.02)
launcher.teardown()
