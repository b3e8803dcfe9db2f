"""``scripts/train.py`` with one fault injected into one rank, for bench/hangs.py and tests/test_hangs.py.

    ANYTOPO_TEST_FAULT=KIND:RANK[:ARG...] torchrun ... bench/_hang_worker.py TRAIN_ARGS...

KIND:
- ``sleep-data:R:K:S``: rank R's training data sleeps S seconds when its K-th sample is read (in the
  DataLoader worker with ``--workers``, else in the main thread);
- ``skip-allreduce:R:K``: rank R does not take part in the K-th step-boundary all-reduce (it returns as if no
  rank had been signalled), so its collectives run one behind the others' from there;
- ``slow-data:R:MS``: every rank's data take 20 ms per batch, rank R's take MS ms (a straggler).

Without the variable it is ``scripts/train.py`` exactly; everything else is as there: ``launcher.run_main(training.cli)``.
"""
from __future__ import annotations

import os
import sys
import time

import collective
import launcher
import training
from torch.utils.data import Dataset
from training import data


class Delayed(Dataset):
    """``base`` whose reads sleep: ``per_item`` seconds each, and ``once_s`` at the ``at``-th read."""

    def __init__(self, base: Dataset, per_item: float = 0.0, at: int | None = None, once_s: float = 0.0):
        self.base, self.per_item, self.at, self.once_s, self.reads = base, per_item, at, once_s, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        self.reads += 1
        if self.reads == self.at:
            time.sleep(self.once_s)
        if self.per_item:
            time.sleep(self.per_item)
        return self.base[index]


def delay_training_data(per_item: float = 0.0, at: int | None = None, once_s: float = 0.0) -> None:
    build = data.build_datasets

    def patched(*args, **kwargs):
        train, test, info = build(*args, **kwargs)
        return Delayed(train, per_item, at, once_s), test, info

    data.build_datasets = patched


def skip_boundary_allreduce(k: int) -> None:
    """The step boundary's all-reduce is the one with two flags (a signal, a failed background write)."""
    any_rank, calls = collective.any_rank, [0]

    def patched(*flags: bool) -> list[bool]:
        if len(flags) == 2:
            calls[0] += 1
            if calls[0] == k:
                return [False] * len(flags)
        return any_rank(*flags)

    collective.any_rank = patched


def inject(spec: str, rank: int) -> None:
    kind, target, *args = spec.split(":")
    per_batch = 0.02 / 16  # slow-data: 20 ms per 16-sample batch on every rank
    if kind == "slow-data":
        delay_training_data(per_item=per_batch * (float(args[0]) / 20 if rank == int(target) else 1))
    elif rank != int(target):
        return
    elif kind == "sleep-data":
        delay_training_data(at=int(args[0]), once_s=float(args[1]))
    elif kind == "skip-allreduce":
        skip_boundary_allreduce(int(args[0]))
    else:
        raise SystemExit(f"unknown ANYTOPO_TEST_FAULT kind {kind!r}")


if __name__ == "__main__":
    if os.environ.get("ANYTOPO_TEST_FAULT"):
        inject(os.environ["ANYTOPO_TEST_FAULT"], int(os.environ.get("RANK", "0")))
    launcher.run_main(lambda: training.cli(sys.argv[1:]))
