"""Checkpoint I/O: save, load and convert, each measured against raw I/O of the same bytes, side by side.

Targets (from the issue), on torchvision ``resnet152(weights=None)`` (~241 MB fp32):

1. **save** ``checkpoint.save(model, "x.safetensors")`` vs writing the same number of bytes raw with the
   same durability (temp file in the same directory, write, flush, ``os.fsync``, ``os.replace``, fsync of
   the directory -- what ``save`` does; fsync is never dropped). Target: ratio <= 1.1. The raw bytes
   are written from a torch-allocated buffer (the verdict: the same kind of memory as the parameters
   ``save`` writes from) and, as an extra row, from a bytearray (slower to copy from, see ``torch_buffer``).
   ``save`` starts the disk writing each 32 MiB chunk while it copies the next (``EarlyWriteback``; the
   final fsync still runs), which a plain raw write does not; so a stricter extra row writes the raw bytes
   with the same early writeback, and its ratio is printed too. Reference rows: ``torch.save(state_dict)``
   and ``safetensors.torch.save_file``, each with the same temp/fsync/replace/dir-fsync.
2. **load** ``checkpoint.load(path, model)`` into a live model vs the real limit: ``f.readinto`` of the same
   file into a buffer from torch's allocator, allocated and touched before the timing (pre-faulted, as the
   model's parameters are; such a buffer gets transparent huge pages where a bytearray does not, and copying
   into it is ~4x faster on the reference VM). Target: ratio <= 1.25, page cache warm AND cold (every call
   evicts both files first, ``posix_fadvise(DONTNEED)``), side by side in one run. The bytearray readinto
   stays as a row (the looser baseline of earlier runs). A cProfile breakdown of ``checkpoint.load`` follows.
   Reference rows:
   ``safetensors.torch.load_file`` alone, ``load_file`` + ``model.load_state_dict``, and
   ``torch.load(weights_only=True)`` + ``load_state_dict``.
3. **convert streams**: ``python -m checkpoint convert SRC DST --max-shard-size 500MB`` on a synthetic
   checkpoint of many tensors, run as a child process. Target: peak RSS <= 0.3 x checkpoint size.
   Also reported: two baselines (the peak RSS of a child that only does ``import checkpoint.cli``, which
   is what a safetensors convert imports -- no torch --, and of one that also imports torch, what a
   ``.pth`` source needs), each row's peak minus its baseline, the conversion phase alone
   (``_convert_probe.py``), and a ``.pth`` -> safetensors row (``torch.load(mmap=True)``: its RSS counts
   the file pages read through the mapping, which the kernel reclaims under memory pressure; that it fits
   under a real memory limit is measured by ``bench/pages_probe.py``).

How:
- Save and load candidates are interleaved, the order rotated each round (A B C D, B C D A, ...), for ``--save-rounds``/``--load-rounds``
  rounds after one untimed warm-up call each; ``gc.collect()`` runs between calls, untimed, and before
  each save call ``os.sync()`` (untimed) so no candidate waits on the previous one's writeback. Reported: median seconds,
  min/max, spread, ratio = median(ours) / median(raw), and the median/min/max of the per-round paired
  ratios (common-mode machine noise cancels in those).
- Peak RSS is ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` read in a small stdlib-only spawner
  (``bench/_peak_rss.py``): a child spawned directly from this (large) process would inherit this
  process's high-water RSS into its ``ru_maxrss`` (see that file). ``/usr/bin/time -v``'s "Maximum
  resident set size" is parsed from the same run as a cross-check when present.
- In full mode the convert sizes are 1 GB and 4 GB. A process that imports torch peaks at ~0.7-0.8 GiB
  RSS on the reference machine (this torch build maps its CUDA libraries), which is why converting
  safetensors checkpoints never imports torch (see ``checkpoint/__init__``); a ``.pth`` source has to.
- Files go to a temporary directory under ``bench/results/`` (same disk as the repository, never tmpfs;
  ``--tmp-dir`` to change), removed at the end.

    .venv/bin/python bench/ckpt_io.py --quick     # seconds: resnet18, 3 rounds, 256 MB convert
    .venv/bin/python bench/ckpt_io.py             # minutes: resnet152, 15/15 rounds, 1 GB and 4 GB convert

Writes bench/results/ckpt_io.json.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
import torchvision
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

import checkpoint
from checkpoint.safetensors_io import WRITEBACK_CHUNK, EarlyWriteback
from checkpoint.writer import parse_size
from _common import (PYTHON, REPO, fmt_bytes, interleave, machine, noisy, ratio, remove, scratch_dir,
                     summarize, table, uptime, verdict, write_result)

BENCH = Path(__file__).resolve().parent
SAVE_TARGET, LOAD_TARGET, RSS_TARGET = 1.10, 1.25, 0.30
OURS_SAVE, RAW_SAVE, RAW_SAVE_T = "anytopo checkpoint.save", "raw write (bytearray)", "raw write (torch buffer)"
RAW_SAVE_WB = "raw write + early writeback (torch buffer)"
OURS_LOAD, RAW_LOAD, RAW_LOAD_T = "anytopo checkpoint.load", "raw readinto (bytearray)", "raw readinto (torch buffer)"


# ------------------------------------------------------------------------------------------ primitives

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Temp file beside ``path``, ``write(f)``, flush, fsync, ``os.replace``, fsync the directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def durable_st_save(sd: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file takes a file name: write to a temp name, fsync it, replace, fsync the dir."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        st_save_file(sd, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_with_early_writeback(f: BinaryIO, view: memoryview) -> None:
    """The raw bytes in ``WRITEBACK_CHUNK`` pieces, each handed to the disk as ``checkpoint.save`` does."""
    wb = EarlyWriteback(f)
    for start in range(0, len(view), WRITEBACK_CHUNK):
        piece = view[start:start + WRITEBACK_CHUNK]
        f.write(piece)
        wb.advance(len(piece))


def read_raw(path: Path, buf: bytearray) -> int:
    """Read the whole file into ``buf`` (preallocated, exactly the file's size) with readinto."""
    view = memoryview(buf)
    done = 0
    with open(path, "rb", buffering=0) as f:
        while done < len(buf):
            n = f.readinto(view[done:])
            if not n:
                raise RuntimeError(f"{path}: short read")
            done += n
    return done


def warm_page_cache(*paths: Path) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def _rows(times: dict[str, list[float]], base: str, nbytes: int) -> list[dict[str, Any]]:
    rows = []
    for name, xs in times.items():
        s = summarize(xs)
        row = {"candidate": name, **{k: s[k] for k in ("median", "min", "max", "spread")},
               "mb_s": nbytes / s["median"] / 1e6, "seconds": xs}
        r = ratio(xs, times[base])
        row.update(ratio=r["ratio"], min_ratio=s["min"] / min(times[base]), paired_median=r["paired_median"],
                   paired_min=r["paired_min"], paired_max=r["paired_max"])
        rows.append(row)
    return rows


TIME_COLUMNS = [("candidate", "candidate", ""), ("median", "median s", ".4f"), ("min", "min s", ".4f"),
                ("max", "max s", ".4f"), ("spread", "spread", ".0%"), ("mb_s", "MB/s", ".0f"),
                ("ratio", "ratio", ".3f"), ("min_ratio", "min/min", ".3f"), ("paired_median", "paired med", ".3f"),
                ("paired_min", "paired min", ".3f"), ("paired_max", "paired max", ".3f")]


# ----------------------------------------------------------------------------------------------- save

def torch_buffer(data: bytes | bytearray | int) -> torch.Tensor:
    """A uint8 tensor from torch's CPU allocator: the same kind of memory as model parameters.

    On Linux torch advises huge pages for large allocations (``AnonHugePages`` in smaps), a plain
    bytearray gets 4 KiB pages; copying a file into or out of the two differs by ~4x on the reference VM
    (TLB misses), so each raw baseline is measured with both kinds of buffer.
    """
    if isinstance(data, int):
        t = torch.empty(data, dtype=torch.uint8)
        t.fill_(0)
        return t
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def bench_save(model: torch.nn.Module, work: Path, rounds: int) -> dict[str, Any]:
    ours_path = work / "ours.safetensors"
    checkpoint.save(model, ours_path)
    payload = bytearray(ours_path.read_bytes())  # the exact bytes ours writes, preallocated once
    nbytes = len(payload)
    raw_bytearray = memoryview(payload)
    raw_torch = memoryview(torch_buffer(payload).numpy())
    candidates = {
        OURS_SAVE: lambda: checkpoint.save(model, ours_path),
        RAW_SAVE: lambda: durable_write(work / "raw.bin", lambda f: f.write(raw_bytearray)),
        RAW_SAVE_T: lambda: durable_write(work / "raw-t.bin", lambda f: f.write(raw_torch)),
        RAW_SAVE_WB: lambda: durable_write(work / "raw-wb.bin", lambda f: write_with_early_writeback(f, raw_torch)),
        "ref torch.save(state_dict)": lambda: durable_write(work / "ref.pth", lambda f: torch.save(model.state_dict(), f)),
        "ref safetensors save_file": lambda: durable_st_save(model.state_dict(), work / "ref.safetensors"),
    }
    for fn in candidates.values():  # warm-up: allocator, imports, first-write effects
        fn()
    assert (work / "raw.bin").stat().st_size == ours_path.stat().st_size == nbytes
    print(f"save: {nbytes:,} bytes per file, {rounds} interleaved rounds (each write fsynced; "
          "os.sync() untimed before each call so no candidate pays for the previous one's writeback)")
    times = interleave(candidates, rounds, timer=time.perf_counter, between=_settle_disk)
    rows = _rows(times, RAW_SAVE_T, nbytes)
    loose = ratio(times[OURS_SAVE], times[RAW_SAVE])
    strict = ratio(times[OURS_SAVE], times[RAW_SAVE_WB])
    r = rows[0]["ratio"]
    return {"bytes": nbytes, "rounds": rounds, "rows": rows, "ratio": r, "target": SAVE_TARGET,
            "verdict": verdict(r, SAVE_TARGET), "baseline": RAW_SAVE_T, "min_ratio": rows[0]["min_ratio"],
            "ratio_vs_bytearray": loose["ratio"], "verdict_vs_bytearray": verdict(loose["ratio"], SAVE_TARGET),
            "ratio_vs_early_writeback": strict["ratio"],
            "verdict_vs_early_writeback": verdict(strict["ratio"], SAVE_TARGET)}


def _settle_disk() -> None:
    gc.collect()
    os.sync()


# ----------------------------------------------------------------------------------------------- load

def drop_cache(*paths: Path) -> None:
    """Evict these files' pages from the page cache (``POSIX_FADV_DONTNEED``: clean pages go, so the next read
    comes from the disk). Per file: the machine is shared, so no global drop_caches."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_load(model: torch.nn.Module, work: Path, rounds: int) -> dict[str, Any]:
    """``checkpoint.load`` against the real limit: ``readinto`` of the same file into a buffer from torch's
    allocator, pre-faulted (allocated and touched outside the timing), as the model's parameters are. Page
    cache warm, then cold (each call starts with both files evicted), side by side in one run."""
    st_path, pth_path = work / "ours.safetensors", work / "ref.pth"
    if not st_path.exists():
        checkpoint.save(model, st_path)
    if not pth_path.exists():
        durable_write(pth_path, lambda f: torch.save(model.state_dict(), f))
    nbytes = st_path.stat().st_size
    buf = bytearray(nbytes)  # preallocated (and touched: bytearray zero-fills) outside the timing
    tbuf = memoryview(torch_buffer(nbytes).numpy())  # pre-faulted: torch_buffer fills it
    candidates = {
        OURS_LOAD: lambda: checkpoint.load(st_path, model),
        RAW_LOAD_T: lambda: read_raw(st_path, tbuf),
        RAW_LOAD: lambda: read_raw(st_path, buf),
        "ref safetensors load_file": lambda: st_load_file(st_path),
        "ref load_file+load_state_dict": lambda: model.load_state_dict(st_load_file(st_path)),
        "ref torch.load+load_state_dict": lambda: model.load_state_dict(torch.load(pth_path, weights_only=True)),
    }
    warm_page_cache(st_path, pth_path)
    for fn in candidates.values():
        fn()
    # correctness once, untimed: what checkpoint.load put into the model is the file's content
    report = checkpoint.load(st_path, model)
    ref = st_load_file(st_path)
    sd = model.state_dict()
    assert report.loaded == len(ref) and all(torch.equal(sd[k], v) for k, v in ref.items()), "load mismatch"
    del ref, sd
    out: dict[str, Any] = {"bytes": nbytes, "rounds": rounds, "target": LOAD_TARGET, "baseline": RAW_LOAD_T}
    for cache in ("warm", "cold"):
        if cache == "warm":
            warm_page_cache(st_path, pth_path)
            between = gc.collect
        else:
            def between() -> None:
                gc.collect()
                drop_cache(st_path, pth_path)
        print(f"load: {nbytes:,} bytes, page cache {cache}, {rounds} interleaved rounds")
        times = interleave(candidates, rounds, timer=time.perf_counter, between=between)
        rows = _rows(times, RAW_LOAD_T, nbytes)
        r = rows[0]["ratio"]
        loose = ratio(times[OURS_LOAD], times[RAW_LOAD])
        out[cache] = {"rows": rows, "ratio": r, "verdict": verdict(r, LOAD_TARGET), "min_ratio": rows[0]["min_ratio"],
                      "paired_median": rows[0]["paired_median"], "ratio_vs_bytearray": loose["ratio"]}
        print(table(rows, TIME_COLUMNS))
    out["ratio"], out["verdict"] = out["warm"]["ratio"], out["warm"]["verdict"]
    return out


def profile_load(model: torch.nn.Module, path: Path, calls: int = 5) -> dict[str, Any]:
    """Where checkpoint.load's time goes (cProfile over a few calls; own time per call, ms)."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        checkpoint.load(path, model)
    pr.disable()
    st = pstats.Stats(pr)
    total = sum(v[2] for v in st.stats.values())
    top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:10]
    rows = [{"function": f"{Path(f).name}:{line}({fn})" if f != "~" else fn, "calls_per_load": v[1] // calls,
             "ms_per_load": v[2] / calls * 1e3} for (f, line, fn), v in top]
    print(f"checkpoint.load profile (cProfile, {calls} calls; profiler overhead inflates small calls):")
    print(table(rows, [("function", "function (own time)", ""), ("calls_per_load", "calls/load", "d"),
                       ("ms_per_load", "ms/load", ".1f")]))
    return {"total_ms_per_load": total / calls * 1e3, "top": rows}


# ----------------------------------------------------------------------------------- whole training entry

OURS_ENTRY_SAVE, RAW_ENTRY_SAVE = "anytopo CheckpointManager.save (entry)", "raw write, same total bytes (torch buffer)"
OURS_ENTRY_LOAD, RAW_ENTRY_LOAD = "anytopo restore (chosen by latest())", "raw readinto, same files (torch buffer)"


def training_state(model: torch.nn.Module) -> dict[str, Any]:
    """The components a training run saves: model, AdamW state after one step, scheduler, trainer counters."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.empty_like(p).normal_(generator=g)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return {"model": model, "optimizer": checkpoint.OptimizerState(model, opt), "scheduler": sched,
            "trainer": {"step": 1, "epoch": 0, "samples_seen": 64, "world_size": 1}}


def _previous_scheme(model: torch.nn.Module, comps: dict[str, Any], path: Path) -> None:
    """What CheckpointManager.save did before: the model through the writer, the other states
    ``torch.save`` -> ``BytesIO`` -> ``getvalue()`` -> one write, then sha256 of every file read back."""
    import io

    from checkpoint.storage import sha256_file

    states = {k: (c.state_dict() if hasattr(c, "state_dict") else c) for k, c in comps.items() if k != "model"}
    path.mkdir(exist_ok=True)
    checkpoint.save(model, path / "model.safetensors")
    buf = io.BytesIO()
    torch.save(states, buf)
    durable_write(path / "state.pth", lambda f: f.write(buf.getvalue()))
    for name in ("model.safetensors", "state.pth"):
        sha256_file(path / name)


def bench_entry(model: torch.nn.Module, work: Path, save_rounds: int, load_rounds: int) -> dict[str, Any]:
    comps = training_state(model)
    mgr = checkpoint.CheckpointManager(work / "entries", keep_last=1)
    step = iter(range(1, 1 << 30))
    entry = mgr.save(next(step), comps)
    files = {p.name: p.stat().st_size for p in sorted(entry.iterdir())}
    nbytes = sum(files.values()) + len("step-1\n")
    raw = memoryview(torch_buffer(nbytes).numpy())
    candidates = {
        OURS_ENTRY_SAVE: lambda: mgr.save(next(step), comps),
        RAW_ENTRY_SAVE: lambda: durable_write(work / "raw-entry.bin", lambda f: f.write(raw)),
        "raw write + early writeback (torch buffer)":
            lambda: durable_write(work / "raw-entry-wb.bin", lambda f: write_with_early_writeback(f, raw)),
        "ref previous scheme (states via torch.save/BytesIO, hashes read back)":
            lambda: _previous_scheme(model, comps, work / "previous"),
    }
    for fn in candidates.values():
        fn()
    print(f"entry save: {nbytes:,} bytes ({', '.join(f'{k} {v:,}' for k, v in files.items())} + pointer), "
          f"{save_rounds} interleaved rounds, os.sync() untimed before each call")
    times = interleave(candidates, save_rounds, timer=time.perf_counter, between=_settle_disk)
    save_rows = _rows(times, RAW_ENTRY_SAVE, nbytes)

    # load: a restore into the live model and optimizer, as a resumed run does after latest() chose the entry
    # (sha256 of every file checked then, see CheckpointManager.latest); the raw row reads the same files
    entry = mgr.latest()
    paths = sorted(entry.iterdir())
    load_bytes = sum(p.stat().st_size for p in paths)
    buf = bytearray(load_bytes)
    tbuf = memoryview(torch_buffer(load_bytes).numpy())

    def read_files(into) -> None:
        view, done = memoryview(into), 0
        for p in paths:
            n = p.stat().st_size
            read_raw(p, view[done:done + n])
            done += n

    from checkpoint import resume

    def restore_verifying() -> None:
        resume.VERIFIED.clear()
        mgr.restore(mgr.latest(), comps)

    def restore_through_dcp() -> None:
        """The restore as it was before the optimizer's index fast path: DCP resolves every parameter's name."""
        fast = checkpoint.OptimizerState._load_by_index
        checkpoint.OptimizerState._load_by_index = lambda *a: False
        try:
            mgr.restore(entry, comps)
        finally:
            checkpoint.OptimizerState._load_by_index = fast

    candidates = {
        OURS_ENTRY_LOAD: lambda: mgr.restore(entry, comps),
        RAW_ENTRY_LOAD: lambda: read_files(tbuf),
        "ref restore before (optimizer via DCP set_optimizer_state_dict)": restore_through_dcp,
        "raw readinto, same files (bytearray)": lambda: read_files(buf),
        "anytopo latest() + restore, sha256 of every file": restore_verifying,
        "ref torch.load(state.pth) + load_state_dict (previous states file)":
            lambda: comps["optimizer"].load_state_dict(
                torch.load(work / "previous" / "state.pth", weights_only=True)["optimizer"]),
    }
    warm_page_cache(*paths, work / "previous" / "state.pth")
    for fn in candidates.values():
        fn()
    print(f"entry load: {load_bytes:,} bytes in {len(paths)} files, page cache warm, {load_rounds} interleaved rounds")
    times = interleave(candidates, load_rounds, timer=time.perf_counter, between=gc.collect)
    load_rows = _rows(times, RAW_ENTRY_LOAD, load_bytes)
    rs, rl = save_rows[0]["ratio"], load_rows[0]["ratio"]
    verifying = next(r for r in load_rows if r["candidate"].startswith("anytopo latest()"))["ratio"]
    loose = ratio(times[OURS_ENTRY_LOAD], times["raw readinto, same files (bytearray)"])["ratio"]
    return {"load_ratio_vs_bytearray": loose, "files": files, "bytes": nbytes, "save_rows": save_rows, "load_rows": load_rows,
            "save_ratio": rs, "save_verdict": verdict(rs, SAVE_TARGET), "load_ratio": rl,
            "load_verdict": verdict(rl, LOAD_TARGET), "load_with_sha256_ratio": verifying}


# -------------------------------------------------------------------------------------------- convert

# fp32 tensors of one synthetic "layer": 32 MiB, 8 MiB, 2 MiB, 16 KiB, 4 KiB (a matrix-heavy model's mix)
LAYER = [(4096, 2048), (2048, 1024), (1024, 512), (4096,), (1024,)]


def synthetic_state(total: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    n, layer = 0, 0
    while n < total:
        for j, shape in enumerate(LAYER):
            t = torch.empty(shape).uniform_(-1, 1, generator=g)
            sd[f"layers.{layer:04d}.p{j}"] = t
            n += t.numel() * t.element_size()
        layer += 1
    return sd


def run_peak(cmd: list[str], *, time_v: bool = True) -> dict[str, Any]:
    """Run ``cmd`` under the small spawner; returns its JSON (rc, ru_maxrss_kib, time_v_maxrss_kib, wall_s)."""
    wrapper = [PYTHON, "-S", str(BENCH / "_peak_rss.py")] + (["--time-v"] if time_v else []) + ["--", *cmd]
    proc = subprocess.run(wrapper, cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"spawner failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(lines[-1])
    if out["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out['rc']}: {proc.stderr[-2000:]}")
    out["log_tail"] = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
    return out


def _mib(kib: float | None) -> float | None:
    return None if kib is None else kib / 1024


def bench_convert(work: Path, size: int, reps: int, pth_reps: int, shard: str,
                  baselines_kib: dict[str, float]) -> dict[str, Any]:
    src_dir, src_pth = work / f"src-{size}", work / f"src-{size}.pth"
    t0 = time.perf_counter()
    sd = synthetic_state(size)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    largest = max(t.numel() * t.element_size() for t in sd.values())
    n_tensors = len(sd)
    checkpoint.save(sd, src_dir)
    checkpoint.save(sd, src_pth)
    del sd
    gc.collect()
    print(f"convert: source {len(os.listdir(src_dir))} files in {src_dir.name}/ and {src_pth.name}: "
          f"{nbytes:,} bytes in {n_tensors} tensors, "
          f"largest {fmt_bytes(largest)} (made in {time.perf_counter() - t0:.1f}s)", flush=True)
    rows: list[dict[str, Any]] = []

    def measure(label: str, cmd_for: Callable[[Path], list[str]], n: int, source: str) -> dict[str, Any]:
        baseline_kib = baselines_kib[source]
        runs = []
        for i in range(n):
            dst = work / f"dst-{size}-{i}"
            r = run_peak(cmd_for(dst))
            shards = sorted(p.name for p in dst.iterdir()) if dst.is_dir() else []
            remove(dst)
            runs.append(r)
            print(f"  {label} run {i + 1}/{n}: peak {_mib(r['ru_maxrss_kib']):.0f} MiB "
                  f"(time -v {_mib(r['time_v_maxrss_kib']) or float('nan'):.0f} MiB), {r['wall_s']:.1f}s, "
                  f"{sum(s.endswith('.safetensors') for s in shards)} shards", flush=True)
        peaks = summarize([r["ru_maxrss_kib"] / 1024 for r in runs])
        tv = [r["time_v_maxrss_kib"] / 1024 for r in runs if r["time_v_maxrss_kib"]]
        row = {"candidate": label, "source": source, "runs": n, "baseline_mib": baseline_kib / 1024,
               "peak_mib": peaks["median"],
               "peak_min_mib": peaks["min"], "peak_max_mib": peaks["max"],
               "time_v_mib": summarize(tv)["median"] if tv else None,
               "minus_baseline_mib": peaks["median"] - baseline_kib / 1024,
               "wall_s": summarize([r["wall_s"] for r in runs])["median"],
               "peak_over_size": peaks["median"] * 2 ** 20 / nbytes,
               "minus_baseline_over_size": (peaks["median"] - baseline_kib / 1024) * 2 ** 20 / nbytes}
        rows.append(row)
        return row

    cli = lambda src: (lambda dst: [PYTHON, "-m", "checkpoint", "convert", str(src), str(dst), "--max-shard-size", shard])
    main_row = measure("cli convert safetensors dir -> shards", cli(src_dir), reps, "safetensors")
    # the conversion phase alone (informational): same CLI code in-process, RSS high-water reset after import
    probe_json = work / "probe.json"
    probe = run_peak([PYTHON, str(BENCH / "_convert_probe.py"), str(probe_json), str(src_dir),
                      str(work / f"dst-{size}-probe"), "--max-shard-size", shard])
    remove(work / f"dst-{size}-probe")
    phases = json.loads(probe_json.read_text())
    after, conv = phases["after_import"], phases["after_convert"]
    rows.append({"candidate": "probe: convert phase alone", "source": "safetensors", "runs": 1,
                 "peak_mib": conv["VmHWM_kib"] / 1024 if phases["hwm_reset"] else None,
                 "minus_baseline_mib": (conv["VmHWM_kib"] - after["VmRSS_kib"]) / 1024 if phases["hwm_reset"] else None,
                 "import_peak_mib": after["VmHWM_kib"] / 1024, "after_import_mib": after["VmRSS_kib"] / 1024,
                 "wall_s": probe["wall_s"], "note": "minus = peak while converting - RSS right after import"})
    print(f"  probe: RSS after import {after['VmRSS_kib'] / 1024:.0f} MiB (import peak {after['VmHWM_kib'] / 1024:.0f}),"
          f" peak while converting {conv['VmHWM_kib'] / 1024:.0f} MiB (reset={phases['hwm_reset']})", flush=True)
    measure("cli convert .pth -> shards (info)", cli(src_pth), pth_reps, "pth")
    remove(src_dir)
    src_pth.unlink(missing_ok=True)
    Path(str(src_pth) + ".manifest.json").unlink(missing_ok=True)
    limit_mib = RSS_TARGET * nbytes / 2 ** 20
    return {"size_bytes": nbytes, "tensors": n_tensors, "largest_tensor_bytes": largest, "max_shard_size": shard,
            "limit_mib": limit_mib, "rows": rows,
            "peak_over_size": main_row["peak_over_size"], "minus_baseline_over_size": main_row["minus_baseline_over_size"],
            "verdict_absolute": verdict(main_row["peak_over_size"], RSS_TARGET),
            "verdict_minus_baseline": verdict(main_row["minus_baseline_over_size"], RSS_TARGET)}


RSS_COLUMNS = [("candidate", "candidate", ""), ("runs", "runs", "d"), ("peak_mib", "peak MiB", ".0f"),
               ("peak_min_mib", "min", ".0f"), ("peak_max_mib", "max", ".0f"), ("time_v_mib", "time -v MiB", ".0f"),
               ("minus_baseline_mib", "minus base MiB", ".0f"), ("peak_over_size", "peak/size", ".3f"),
               ("minus_baseline_over_size", "minus/size", ".3f"), ("wall_s", "wall s", ".1f")]


# ----------------------------------------------------------------------------------------------- main

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, seconds (resnet18, 3 rounds, 256MB convert)")
    p.add_argument("--model", default=None, help="torchvision model for save/load (default resnet152; quick resnet18)")
    p.add_argument("--save-rounds", type=int, default=None, help="interleaved save rounds (default 15; quick 3)")
    p.add_argument("--load-rounds", type=int, default=None, help="interleaved load rounds (default 15; quick 3)")
    p.add_argument("--convert-sizes", default=None, help="comma list, e.g. 1GB,4GB (default; quick 256MB)")
    p.add_argument("--convert-reps", type=int, default=None, help="runs per convert size (default 3; quick 1)")
    p.add_argument("--pth-reps", type=int, default=None, help="runs of the .pth convert row (default 2; quick 1)")
    p.add_argument("--max-shard-size", default="500MB")
    p.add_argument("--only", choices=["save", "load", "entry", "convert"], action="append", default=None,
                   help="run only these parts (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--tmp-dir", default=None, help="parent of the scratch directory (default bench/results/)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    q = args.quick
    model_name = args.model or ("resnet18" if q else "resnet152")
    save_rounds = args.save_rounds or (3 if q else 15)
    load_rounds = args.load_rounds or (3 if q else 15)
    sizes = [parse_size(s) for s in (args.convert_sizes or ("256MB" if q else "1GB,4GB")).split(",")]
    reps = args.convert_reps or (1 if q else 3)
    pth_reps = args.pth_reps or (1 if q else 2)
    parts = args.only or ["save", "load", "entry", "convert"]
    if args.threads:
        torch.set_num_threads(args.threads)

    result: dict[str, Any] = {"bench": "ckpt_io", "quick": q, "machine": machine(), "model": model_name,
                              "argv": sys.argv, "uptime": []}
    work = scratch_dir(".ckpt_io-", args.tmp_dir)
    result["scratch"] = str(work)
    try:
        if "convert" in parts:
            need = 3 * max(sizes) + (1 << 30)
            free = shutil.disk_usage(work).free
            if free < need:
                raise SystemExit(f"error: {fmt_bytes(free)} free under {work}, need {fmt_bytes(need)}: "
                                 "pass --convert-sizes smaller or --tmp-dir elsewhere")
        if "save" in parts or "load" in parts or "entry" in parts:
            model = build_model(model_name)
            nparams = sum(p.numel() for p in model.parameters())
            print(f"model {model_name}: {nparams:,} parameters, torch threads {torch.get_num_threads()}")
            result["model_params"] = nparams
            if "save" in parts:
                result["uptime"].append(uptime("before save"))
                result["save"] = bench_save(model, work, save_rounds)
                result["uptime"].append(uptime("after save"))
                print(table(result["save"]["rows"], TIME_COLUMNS))
            if "load" in parts:
                result["uptime"].append(uptime("before load"))
                result["load"] = bench_load(model, work, load_rounds)
                result["uptime"].append(uptime("after load"))
                result["load"]["profile"] = profile_load(model, work / "ours.safetensors")
            if "entry" in parts:
                result["uptime"].append(uptime("before entry"))
                result["entry"] = bench_entry(model, work, save_rounds, load_rounds)
                result["uptime"].append(uptime("after entry"))
                print(table(result["entry"]["save_rows"], TIME_COLUMNS))
                print(table(result["entry"]["load_rows"], TIME_COLUMNS))
            del model
            for p in work.iterdir():
                p.unlink() if p.is_file() else remove(p)
            gc.collect()
        if "convert" in parts:
            result["uptime"].append(uptime("before convert"))
            # What each convert starts from: the CLI's own imports (a safetensors source never imports
            # torch) and, for a .pth source, the same plus torch.
            baselines: dict[str, float] = {}
            result["convert_baseline"] = {}
            for source, code in (("safetensors", "import checkpoint.cli"), ("pth", "import torch, checkpoint.cli")):
                base_runs = [run_peak([PYTHON, "-c", code]) for _ in range(3)]
                base = summarize([r["ru_maxrss_kib"] for r in base_runs])
                baselines[source] = base["median"]
                print(f"baseline `python -c '{code}'`: peak RSS {base['median'] / 1024:.0f} MiB "
                      f"(min {base['min'] / 1024:.0f}, max {base['max'] / 1024:.0f}; "
                      f"time -v {(base_runs[0]['time_v_maxrss_kib'] or 0) / 1024:.0f} MiB)", flush=True)
                result["convert_baseline"][source] = {"code": code, "peak_mib": base["median"] / 1024,
                                                      "min_mib": base["min"] / 1024, "max_mib": base["max"] / 1024,
                                                      "runs": base_runs}
            result["convert"] = []
            for size in sizes:
                c = bench_convert(work, size, reps, pth_reps, args.max_shard_size, baselines)
                result["convert"].append(c)
                print(f"convert {c['size_bytes'] / 1e9:.2f} GB = {fmt_bytes(c['size_bytes'])} "
                      f"(limit 0.3 x size = {c['limit_mib']:.0f} MiB):")
                print(table(c["rows"], RSS_COLUMNS))
            result["uptime"].append(uptime("after convert"))
    finally:
        remove(work)
    result["noisy"] = noisy(result["uptime"])

    print("\nsummary" + (" (QUICK mode: sizes are not the target configuration)" if q else ""))
    if "save" in result:
        s = result["save"]
        print(f"  save  ratio {s['ratio']:.3f} vs raw write from a torch buffer (target <= {SAVE_TARGET}) {s['verdict']} "
              f"(min/min {s['min_ratio']:.3f}); vs raw write from a bytearray {s['ratio_vs_bytearray']:.3f} "
              f"{s['verdict_vs_bytearray']}; vs a raw write that also starts writeback early "
              f"{s['ratio_vs_early_writeback']:.3f} {s['verdict_vs_early_writeback']}")
    if "load" in result:
        s = result["load"]
        for cache in ("warm", "cold"):
            c = s[cache]
            print(f"  load ({cache} cache) ratio {c['ratio']:.3f} vs readinto a pre-faulted torch buffer (target <= "
                  f"{LOAD_TARGET}) {c['verdict']} (paired {c['paired_median']:.3f}, min/min {c['min_ratio']:.3f}); "
                  f"vs readinto a bytearray {c['ratio_vs_bytearray']:.3f}")
    if "entry" in result:
        s = result["entry"]
        print(f"  entry save ratio {s['save_ratio']:.3f} vs a raw durable write of the same total bytes "
              f"(target <= {SAVE_TARGET}) {s['save_verdict']}; entry load (restore after latest()) ratio "
              f"{s['load_ratio']:.3f} vs readinto a pre-faulted torch buffer (target <= {LOAD_TARGET}) {s['load_verdict']} "
              f"(vs a bytearray {s['load_ratio_vs_bytearray']:.3f}); "
              f"with sha256 of every file {s['load_with_sha256_ratio']:.3f}")
    for c in result.get("convert", []):
        print(f"  convert {c['size_bytes'] / 1e9:.2f} GB: peak/size {c['peak_over_size']:.3f} {c['verdict_absolute']}, "
              f"(peak - baseline)/size {c['minus_baseline_over_size']:.3f} {c['verdict_minus_baseline']} "
              f"(target <= {RSS_TARGET})")
    if result["noisy"]:
        print("  note: load average was > 1 during the run (shared machine): expect extra spread")
    write_result("ckpt_io", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
