"""Checkpoints on an object store against the client alone: save and load of a ResNet-152 entry, side by side.

One SeaweedFS server on 127.0.0.1 (bench/_s3.py), torchvision ``resnet152(weights=None)`` (~241 MB fp32):

1. **save** ``CheckpointManager(s3://...).save(step, {"model": model})`` -- the entry written to a local
   staging directory, uploaded (multipart, 16 MiB parts), committed by its manifest -- vs ``obstore.put`` of
   the same number of bytes from memory with the same part size and concurrency. Target <= 1.15.
2. **load** ``checkpoint.load(entry_url, model, verify=False)`` -- header by a ranged GET, tensors by
   ranged GETs copied into the parameters -- vs ``obstore.get`` of the same object into memory. Target <= 1.2.
3. **stall** of an asynchronous save (``async_save=True``: ``save()`` returns once the state is snapshotted;
   the upload runs in the background): seconds ``save()`` blocks with ``s3://`` against a local directory,
   each followed (untimed) by ``flush()``.

Each pair is interleaved, the order rotated each round; reported: medians, ratio of medians, paired ratios.
``--quick``: 3 rounds and a ResNet-50.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import interleave, machine, ratio, summarize, table, uptime, verdict, write_result
from _s3 import s3_server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    import obstore
    import torch
    import torchvision

    import checkpoint
    from checkpoint import objstore

    torch.manual_seed(0)
    model = (torchvision.models.resnet50 if args.quick else torchvision.models.resnet152)(weights=None)
    target = (torchvision.models.resnet50 if args.quick else torchvision.models.resnet152)(weights=None)
    before = uptime("before")
    results: dict = {}
    with s3_server() as s, tempfile.TemporaryDirectory(prefix="anytopo-s3io-") as local:
        os.environ.update(s.env)
        store = objstore._store(s.bucket)
        mgr = checkpoint.CheckpointManager(s.url("bench/ckpt"), keep_last=1)
        entry = mgr.save(0, {"model": model})
        size = sum(m["size"] for m in entry.walk_objects())
        weights = entry / "model.safetensors"
        blob = os.urandom(size)
        step = iter(range(1, 10 ** 6))
        saves = interleave({
            "anytopo save": lambda: mgr.save(next(step), {"model": model}),
            "obstore put": lambda: obstore.put(store, "raw/blob.bin", blob, chunk_size=objstore.PART_BYTES,
                                               max_concurrency=objstore.UPLOAD_CONCURRENCY),
        }, rounds, timer=time.perf_counter, between=gc.collect)
        latest = mgr.latest()
        loads = interleave({
            "anytopo load": lambda: checkpoint.load(latest, target, verify=False),
            "obstore get": lambda: obstore.get(store, weights.key if weights.is_file() else
                                               (latest / "model.safetensors").key).bytes(),
        }, rounds, timer=time.perf_counter, between=gc.collect)
        remote = checkpoint.CheckpointManager(s.url("bench/async"), keep_last=1, async_save=True)
        disk = checkpoint.CheckpointManager(Path(local) / "ckpt", keep_last=1, async_save=True)
        steps = iter(range(1, 10 ** 6))

        def stall(mgr_):
            def run():
                t0 = time.perf_counter()
                mgr_.save(next(steps), {"model": model})
                took = time.perf_counter() - t0
                mgr_.flush()
                return took
            return run

        stalls: dict[str, list[float]] = {"async save, s3://": [], "async save, local dir": []}
        for r in range(rounds):
            order = list(stalls) if r % 2 == 0 else list(reversed(stalls))
            for name in order:
                gc.collect()
                stalls[name].append(stall(remote if "s3" in name else disk)())
            print(f"  round {r + 1}/{rounds}: " + "  ".join(f"{n} {v[-1]:.4f}s" for n, v in stalls.items()),
                  flush=True)
        results = {"entry_bytes": size, "save": saves, "load": loads, "stall": stalls}
    after = uptime("after")
    rows = []
    for label, res, target_ratio in (("save", saves, 1.15), ("load", loads, 1.2), ("stall", stalls, None)):
        (a, av), (b, bv) = res.items()
        r = ratio(av, bv)
        rows.append({"what": f"{a} / {b}", "ours_s": summarize(av)["median"], "base_s": summarize(bv)["median"],
                     "ratio": r["ratio"], "paired": r["paired_median"],
                     "target": target_ratio, "verdict": verdict(r["ratio"], target_ratio) if target_ratio else "-"})
    print(f"entry: {results['entry_bytes'] / 1e6:.1f} MB")
    print(table(rows, [("what", "candidates", ""), ("ours_s", "ours s", ".3f"), ("base_s", "base s", ".3f"),
                       ("ratio", "ratio", ".3f"), ("paired", "paired median", ".3f"), ("target", "target", ""),
                       ("verdict", "verdict", "")]))
    write_result("s3_io" + ("-quick" if args.quick else ""),
                 {"machine": machine(), "uptime": [before, after], "rows": rows, "raw": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
