"""How long a checkpoint save stalls training: synchronous vs asynchronous saves, side by side.

Two measurements per model (torchvision ResNet-18 and ResNet-50, 10 classes, AdamW state after one step,
LambdaLR, trainer counters; CPU):

1. **Blocked time per save**: the wall time ``CheckpointManager.save`` keeps the training thread, for a
   synchronous save (the whole durable write) and an asynchronous one (the snapshot into reused CPU
   buffers; the write runs in the background), against the floor: an in-memory copy of the state's bytes
   (every model and optimizer tensor copied into preallocated buffers by one ``torch._foreach_copy_``). The previous
   background write is waited for outside the timer, so each async figure is the steady-state stall when
   the write keeps up with training. Target: async <= 1.2x the copy.
2. **Training throughput** with a save every 10 steps vs no saving. One sample is one block of 10 training
   steps as a run that saves every 10 steps lives it: the save, the 10 steps its background write
   (async) overlaps, and the wait for whatever of that write did not fit in them (what the next save would
   wait for). Candidates alternate block by block (``--tp-rounds`` rounds of one block each, ~2 s), so the
   VM's slow drift (the same 30 steps vary 7.0-8.6 s from minute to minute here) falls on all of them
   alike. Target: overlap (train.py's async saves, ``overlap_snapshot=True``) >= 0.98x no saving; "async"
   (the snapshot copied at save time) is shown beside it.

Candidates are interleaved, their order rotated each round. Prints a table and writes
bench/results/ckpt_stall.json.

    PYTHONPATH=$PWD flock /tmp/anytopo-cpu.lock .venv/bin/python bench/ckpt_stall.py           # ~5 min
    PYTHONPATH=$PWD .venv/bin/python bench/ckpt_stall.py --quick                              # plumbing only
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

from checkpoint import CheckpointManager, OptimizerState
from _common import (fmt_bytes, interleave, machine, noisy, ratio, remove, scratch_dir, summarize, table,
                     uptime, write_result)


class Training:
    """A ResNet training state on CPU and one step of training on random images."""

    def __init__(self, name: str, batch: int, image_size: int):
        torch.manual_seed(0)
        self.model = getattr(torchvision.models, name)(num_classes=10)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)
        self.trainer: dict[str, Any] = {"step": 0}
        self.x = torch.randn(batch, 3, image_size, image_size)
        self.y = torch.randint(0, 10, (batch,))
        self.step()

    def step(self) -> None:
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.trainer["step"] += 1

    def components(self) -> dict[str, Any]:  # built once, as scripts/train.py does
        if not hasattr(self, "_components"):
            self._components = {"model": self.model, "optimizer": OptimizerState(self.model, self.opt),
                                "scheduler": self.sched, "trainer": self.trainer}
        return self._components

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in self.model.state_dict().values()] + \
            [v for s in self.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def blocked(name: str, rounds: int, work: Path, args) -> dict[str, Any]:
    run = Training(name, args.batch, args.image_size)
    tensors = run.tensors()
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    buffers = [torch.empty_like(t) for t in tensors]
    sync = CheckpointManager(work / f"{name}-sync", keep_last=2)
    asyn = CheckpointManager(work / f"{name}-async", keep_last=2, async_save=True)
    over = CheckpointManager(work / f"{name}-overlap", keep_last=2, async_save=True, overlap_snapshot=True)
    step = [0]
    write_s: list[float] = []

    def copy() -> None:  # the floor: every byte copied once, by one C++ call (no Python per tensor)
        torch._foreach_copy_(buffers, tensors)

    def save(mgr: CheckpointManager) -> None:
        step[0] += 1
        run.trainer["step"] = step[0]
        mgr.save(step[0], run.components())

    def settle() -> None:  # the previous background write ends outside the timers
        t = time.perf_counter()
        if asyn.in_flight():
            asyn.wait()
            write_s.append(time.perf_counter() - t)
        over.wait()

    for mgr in (sync, asyn, over):  # first saves allocate the buffers and warm the page cache paths
        save(mgr)
    settle()
    copy()
    times = interleave({"copy": copy, "sync": lambda: save(sync), "async": lambda: save(asyn),
                        "overlap": lambda: save(over)}, rounds, timer=time.perf_counter, between=settle)
    asyn.flush(), over.flush()
    out = {"model": name, "state_bytes": nbytes, "times": {k: summarize(v) for k, v in times.items()},
           "async_vs_copy": ratio(times["async"], times["copy"]), "sync_vs_copy": ratio(times["sync"], times["copy"]),
           "async_vs_sync": ratio(times["async"], times["sync"]),
           "overlap_vs_copy": ratio(times["overlap"], times["copy"]),
           "entry_bytes": sum(p.stat().st_size for p in asyn.latest().iterdir())}
    return out


def throughput(name: str, rounds: int, work: Path, args) -> dict[str, Any]:
    run = Training(name, args.batch, args.image_size)
    mgrs = {"sync": CheckpointManager(work / f"{name}-tp-sync", keep_last=2),
            "async": CheckpointManager(work / f"{name}-tp-async", keep_last=2, async_save=True),
            "overlap": CheckpointManager(work / f"{name}-tp-overlap", keep_last=2, async_save=True,
                                         overlap_snapshot=True)}
    step = [0]

    def block(kind: str) -> None:
        """One timed sample: a save (none for "none"), then 10 training steps, then (async) the wait for
        the background write if it has not ended by then. The save is the one a run that saves every 10
        steps makes at this step; the write it starts overlaps these 10 steps, and any of it that does not
        fit in them is counted, as the next save would wait for it."""
        mgr = mgrs.get(kind)
        if mgr is not None:
            run.trainer["step"] = step[0]
            mgr.save(step[0], run.components())
        for _ in range(10):
            run.step()
            step[0] += 1
        if mgr is not None:
            mgr.wait()

    for kind in mgrs:  # warm-up: buffers, snapshot plan, page cache paths, one entry to prune later
        block(kind), block(kind)
    elapsed = interleave({k: (lambda k=k: block(k)) for k in ("none", "sync", "async", "overlap")}, rounds,
                         timer=time.perf_counter)
    for mgr in mgrs.values():
        mgr.flush()
    rate = {k: [10 * args.batch / s for s in v] for k, v in elapsed.items()}
    return {"model": name, "steps_per_sample": 10, "samples": rounds,
            "samples_per_s": {k: summarize(v) for k, v in rate.items()},
            # throughput ratios: none / candidate time == candidate rate / none rate
            "async_vs_none": ratio(elapsed["none"], elapsed["async"]),
            "overlap_vs_none": ratio(elapsed["none"], elapsed["overlap"]),
            "sync_vs_none": ratio(elapsed["none"], elapsed["sync"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="resnet18 only, few rounds: checks the plumbing")
    ap.add_argument("--models", nargs="+", default=None, help="torchvision resnets (default: resnet18 resnet50)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per measurement")
    ap.add_argument("--tp-rounds", type=int, default=None, help="throughput rounds, one 10-step block per candidate "
                    "(default 24)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for training")
    ap.add_argument("--tmp-dir", default=None)
    args = ap.parse_args()
    models = args.models or (["resnet18"] if args.quick else ["resnet18", "resnet50"])
    rounds = args.rounds or (2 if args.quick else 7)
    tp_rounds = args.tp_rounds or (2 if args.quick else 24)
    torch.set_num_threads(args.threads)
    work = scratch_dir("ckpt_stall.", args.tmp_dir)
    result: dict[str, Any] = {"machine": machine(), "quick": args.quick, "args": vars(args), "uptime": [],
                              "blocked": [], "throughput": []}
    try:
        for name in models:
            result["uptime"].append(uptime(f"before {name} blocked"))
            result["blocked"].append(blocked(name, rounds, work, args))
            result["uptime"].append(uptime(f"before {name} throughput"))
            result["throughput"].append(throughput(name, tp_rounds, work, args))
        result["uptime"].append(uptime("after"))
    finally:
        remove(work)
    result["noisy"] = noisy(result["uptime"])
    tag = "QUICK " if args.quick else ""
    rows = []
    for b in result["blocked"]:
        t = b["times"]
        rows.append({"model": b["model"], "bytes": fmt_bytes(b["state_bytes"]), "copy": t["copy"]["median"] * 1e3,
                     "sync": t["sync"]["median"] * 1e3, "async": t["async"]["median"] * 1e3,
                     "overlap": t["overlap"]["median"] * 1e3,
                     "async/copy": b["async_vs_copy"]["ratio"], "paired": b["async_vs_copy"]["paired_median"],
                     "sync/copy": b["sync_vs_copy"]["ratio"]})
    print(f"\n{tag}blocked per save (ms, medians of {rounds}): target async/copy <= 1.2")
    print(table(rows, [("model", "model", ""), ("bytes", "state", ""), ("copy", "copy", ".1f"), ("sync", "sync", ".1f"),
                       ("async", "async", ".1f"), ("overlap", "overlap", ".1f"), ("async/copy", "async/copy", ".3f"),
                       ("paired", "paired", ".3f"),
                       ("sync/copy", "sync/copy", ".2f")]))
    rows = []
    for tp in result["throughput"]:
        s = tp["samples_per_s"]
        rows.append({"model": tp["model"], "none": s["none"]["median"], "sync": s["sync"]["median"],
                     "async": s["async"]["median"], "overlap": s["overlap"]["median"],
                     "async/none": tp["async_vs_none"]["ratio"],
                     "overlap/none": tp["overlap_vs_none"]["ratio"], "o-paired": tp["overlap_vs_none"]["paired_median"],
                     "paired": tp["async_vs_none"]["paired_median"], "sync/none": tp["sync_vs_none"]["ratio"]})
    print(f"\n{tag}throughput, samples/s, save every 10 steps ({tp_rounds} rounds of one 10-step block each, "
          f"batch {args.batch}, {args.image_size}x{args.image_size}): target overlap/none >= 0.98 (overlap: train.py's "
          "async saves; async: the snapshot copied at save time)")
    print(table(rows, [("model", "model", ""), ("none", "none", ".1f"), ("sync", "sync", ".1f"), ("async", "async", ".1f"),
                       ("overlap", "overlap", ".1f"), ("overlap/none", "overlap/none", ".3f"), ("o-paired", "paired", ".3f"),
                       ("async/none", "async/none", ".3f"), ("paired", "paired", ".3f"), ("sync/none", "sync/none", ".3f")]))
    ok_blocked = all(b["async_vs_copy"]["ratio"] <= 1.2 for b in result["blocked"])
    ok_tp = all(tp["overlap_vs_none"]["ratio"] >= 0.98 for tp in result["throughput"])  # train.py's async saves
    result["targets"] = {"blocked_async_vs_copy_le_1.2": ok_blocked, "throughput_overlap_vs_none_ge_0.98": ok_tp}
    print(f"\n{tag}targets: blocked {'met' if ok_blocked else 'MISSED'}, throughput {'met' if ok_tp else 'MISSED'}"
          + ("  (noisy: load average > 1 during the run)" if result["noisy"] else ""))
    write_result("ckpt_stall_quick" if args.quick else "ckpt_stall", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
