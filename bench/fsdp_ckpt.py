"""FSDP2 checkpoint I/O on CPU (gloo), side by side in one run: time and per-rank peak RSS growth.

    .venv/bin/python bench/fsdp_ckpt.py [--model mlp|resnet152] [--mlp-hidden 11000] [--rounds 1]

Save from FSDP at world 2: ours canonical (checkpoint.save, one file), ours sharded (CheckpointManager
sharded=True, one file per rank), torch's ``dcp.save`` of the sharded state dict, and
``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` + ``safetensors.save_file`` on rank 0.
Load into FSDP at world 2 and 3: ours from the canonical file, ours from the sharded entry, ``dcp.load``.
--optim adds two training-entry saves (weights + AdamW moments): ``CheckpointManager`` canonical (the moments
gathered to rank 0) and sharded (each rank writes its own moments). Peak RSS growth is sampled from /proc/self/statm every 2 ms during each operation, above the RSS before it
(the rank's shards are already resident). The default MLP (hidden 11000, 784 -> 11000 -> 11000 -> 10) is
~0.52 GB of float32 weights; --mlp-hidden 16000 gives ~1.07 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import launcher

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Peak:
    """Max RSS above the value at entry, sampled by a thread."""

    def __enter__(self):
        self.base = self.peak = rss()
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.stop = True
        self.t.join()
        self.peak = max(self.peak, rss())
        self.growth = self.peak - self.base


def build(args):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if args.model == "mlp":
        h = args.mlp_hidden
        return nn.Sequential(nn.Flatten(), nn.Linear(784, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
    import models

    return models.build_model("resnet152", num_classes=10, in_channels=3)


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)

    import checkpoint

    work = Path(args.dir)
    with launcher.distributed("fsdp") as info:
        model = launcher.wrap_model(build(args), info)
        rank, world = info.rank, info.world_size
        results = {}

        def run(name, fn, output=None):
            """Time ``fn(r)`` per round. Every save writes a fresh path (``output(r)``), as dcp.save does, so no
            method pays for deleting or replacing an older checkpoint inside the timing (on ext4 unlinking
            1 GB takes ~0.35 s); rounds after the first are removed after their timing (rank 0)."""
            for r in range(args.rounds):
                dist.barrier()
                with Peak() as p:
                    fn(r)
                dist.barrier()
                results.setdefault(name, []).append((p.seconds, p.growth))
                if output is not None and r > 0 and rank == 0:
                    out = output(r)
                    shutil.rmtree(out) if out.is_dir() else out.unlink()
                dist.barrier()

        if args.phase == "save":
            def full_st(r):
                import safetensors.torch

                sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                if rank == 0:
                    safetensors.torch.save_file(sd, str(work / f"full-{r}.safetensors"))

            def manager(name, r, **kw):  # a fresh directory per round: no pruning, no replaced entry
                return checkpoint.CheckpointManager(work / f"{name}-{r}", keep_last=None, **kw)

            if args.optim:  # a training entry: weights + AdamW moments (2x the weights), canonical vs sharded
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                x = torch.randn(4, 3, 64, 64) if args.model == "resnet152" else torch.randn(4, 784)
                model(x).float().sum().backward()
                opt.step()
                comps = {"model": model, "optimizer": checkpoint.OptimizerState(model, opt)}
                run("entry canonical+AdamW", lambda r: manager("mgr-full", r).save(1, comps),
                    lambda r: work / f"mgr-full-{r}")
                run("entry sharded+AdamW", lambda r: manager("mgr-opt", r, sharded=True).save(1, comps),
                    lambda r: work / f"mgr-opt-{r}")
            run("ours canonical", lambda r: checkpoint.save(model, work / f"canonical-{r}.safetensors"),
                lambda r: work / f"canonical-{r}.safetensors")
            run("ours sharded", lambda r: manager("mgr", r, sharded=True).save(1, {"model": model}),
                lambda r: work / f"mgr-{r}")
            # dcp.save's FileSystemWriter fsyncs each file it writes (sync_files=True, its default), as ours do;
            # spelled out so the comparison stays like with like
            run("dcp.save", lambda r: dcp.save(get_model_state_dict(model), storage_writer=dcp.FileSystemWriter(
                work / f"dcp-{r}", sync_files=True)), lambda r: work / f"dcp-{r}")
            run("full sd + safetensors", full_st, lambda r: work / f"full-{r}.safetensors")
        else:
            sharded_entry = work / "mgr-0" / "step-1"
            run("ours canonical", lambda r: checkpoint.load(work / "canonical-0.safetensors", model))
            run("ours sharded", lambda r: checkpoint.load(sharded_entry, model))

            def dcp_load(r):
                sd = get_model_state_dict(model)
                dcp.load(sd, checkpoint_id=str(work / "dcp-0"))
                set_model_state_dict(model, sd)
            run("dcp.load", dcp_load)
        shard_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        rows = [None] * world
        dist.all_gather_object(rows, {"rank": rank, "results": results, "shard_bytes": shard_bytes})
        if rank == 0:
            print("RESULT " + json.dumps(rows), flush=True)
        dist.barrier()


def launch(args, phase: str, world: int, work: Path) -> list[dict]:
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={world}",
           __file__, "--worker", "--phase", phase, "--dir", str(work), "--model", args.model,
           "--mlp-hidden", str(args.mlp_hidden), "--rounds", str(args.rounds)] + (["--optim"] if args.optim else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"bench child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT "):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["mlp", "resnet152"], default="mlp")
    p.add_argument("--mlp-hidden", type=int, default=11000)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--optim", action="store_true", help="also save training entries with AdamW state "
                   "(canonical: moments gathered on rank 0; sharded: each rank writes its own)")
    p.add_argument("--dir", default=None)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--phase", default="save")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    work = Path(tempfile.mkdtemp(prefix="fsdp-ckpt-", dir=args.dir))
    try:
        report = {"save x2": launch(args, "save", 2, work)}
        ckpt = (work / "canonical-0.safetensors").stat().st_size
        report["load x2"] = launch(args, "load", 2, work)
        report["load x3"] = launch(args, "load", 3, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"model {args.model}, checkpoint {ckpt / 1e6:.0f} MB, rounds {args.rounds}; "
          "time = median over rounds of the slowest rank; paired = median of per-round ratios; "
          "RSS = max over ranks of peak growth")
    for phase, rows in report.items():
        names = list(rows[0]["results"])
        base = "dcp.save" if phase.startswith("save") else "dcp.load"
        t_base = sorted(max(r["results"][base][i][0] for r in rows) for i in range(args.rounds))[args.rounds // 2]
        for name in names:
            if name not in rows[0]["results"] or base not in rows[0]["results"]:
                continue
            per_round = [max(r["results"][name][i][0] for r in rows) for i in range(args.rounds)]
            base_round = [max(r["results"][base][i][0] for r in rows) for i in range(args.rounds)]
            t = sorted(per_round)[args.rounds // 2]
            # paired: the median of the per-round ratios (each round runs every method back to back)
            paired = sorted(a / b for a, b in zip(per_round, base_round))[args.rounds // 2]
            growth = max(g for r in rows for _, g in r["results"][name])
            shard = max(r["shard_bytes"] for r in rows)
            rank0 = max(g for _, g in rows[0]["results"][name])
            print(f"{phase:8s} {name:24s} {t:7.2f} s  rank 0 +{rank0 / 1e6:6.0f} MB  {t / t_base:5.2f}x {base:8s} "
                  f"(paired {paired:4.2f}x, rounds {' '.join(f'{x:.2f}' for x in per_round)})  peak RSS +{growth / 1e6:7.0f} MB "
                  f"= {growth / ckpt:4.2f}x ckpt (shard {shard / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    launcher.run_main(main)
