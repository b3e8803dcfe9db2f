"""Faults during ``CheckpointManager.save``: SIGKILL at random points, and a disk that fills up.

(a) **kills**: a ResNet-18 training state (model, AdamW state after one step, LambdaLR, trainer counters) is
    saved again and again by ``CheckpointManager.save`` in a forked child that is SIGKILLed after a random
    delay, drawn uniformly from 0 to 1.25x a calibrated save's duration (so kills land in every phase: state
    copy, model file, state files, manifest, directory rename, pointer update, pruning, and some after the
    save returned). After each kill a fresh manager checks, with every cache cleared:
    - ``latest()`` finds an entry, and ``restore`` loads it into a model and optimizer (sha256 of every
      file verified): an "unloadable latest" otherwise;
    - that entry's step is at least the last step whose save returned before the kill, and its weights and
      trainer counters are that step's (each save writes a distinct, checkable state): a "lost completed
      checkpoint" otherwise;
    - the next save cleans every temp the kill left (``.step-*`` dirs, ``.latest.*.tmp``).
    Target: 0 unloadable, 0 lost, over 100 kills.
(a, async) the same with asynchronous saves (``async_save=True``): the child saves, then changes the state
    in place as training would while the background thread writes, then flushes; kills land in the
    snapshot, in the background write and in the flush. "Completed" means the flush had returned. The
    entry ``latest`` names must hold the snapshot (the step's values), never the state changed after it.
(d) **disk full**: the same state saved into a small tmpfs mount whose free space runs out somewhere in
    the second save (sizes drawn at random, so the failure lands in different files), and under
    RLIMIT_FSIZE (EFBIG) with random limits. Each trial must end in one ``CheckpointError`` line that
    names the fix, with the first entry intact and ``latest``, and no temp left. tmpfs trials need root
    and mount rights; they are reported as not run otherwise.

    .venv/bin/python bench/faults_save.py --quick    # 10 + 5 async kills + 4 disk-full trials (run by make test)
    .venv/bin/python bench/faults_save.py            # 100 + 100 async kills + 20 disk-full trials

Prints the counts and writes bench/results/faults_save.json; exits 1 if any target is missed.
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

import checkpoint
from checkpoint import CheckpointError, CheckpointManager, OptimizerState
from checkpoint import resume
from _common import machine, uptime, write_result


class State:
    """A ResNet-18 training state whose contents say which step they were saved at."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torchvision.models.resnet18(num_classes=10)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)
        self.model(torch.randn(2, 3, 32, 32)).sum().backward()
        self.opt.step()
        self.sched.step()
        self.trainer: dict[str, Any] = {}

    def stamp(self, step: int) -> None:
        with torch.no_grad():
            self.model.fc.bias[0] = float(step)
        self.trainer.update(step=step, samples_seen=step * 64)

    def components(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": OptimizerState(self.model, self.opt), "scheduler": self.sched,
                "trainer": self.trainer}


def save_in_child(mgr: CheckpointManager, state: State, step: int, *, background: bool = False,
                  signal_fd: int | None = None) -> int:
    """Fork; the child saves ``step`` and exits 0. Returns the child's pid.

    ``background``: the child saves asynchronously as scripts/train.py does (``async_save=True,
    overlap_snapshot=True``), writes one byte to ``signal_fd`` when ``save`` has returned (the copy of weights
    and optimizer state, then the write, are then in flight in the background thread), takes an optimizer
    step and changes the state in place right after it, as training would (so an entry holding anything but
    the snapshot fails the check), then flushes;
    exit 0 means the flush returned, i.e. the entry is durable and ``latest``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            state.stamp(step)
            if background:
                mgr = CheckpointManager(mgr.directory, keep_last=mgr.keep_last, async_save=True,
                                        overlap_snapshot=True)
                mgr.save(step, state.components())
                if signal_fd is not None:
                    os.write(signal_fd, b"s")
                # training goes on while the entry is written: an optimizer step (whose pre-hook, the manager's,
                # waits for the snapshot's deferred copy), then the step's values stamped in place
                hook = state.opt.register_step_post_hook(lambda *a: state.stamp(-step))
                state.opt.step()
                hook.remove()
                mgr.flush()
            else:
                mgr.save(step, state.components())
            code = 0
        finally:
            os._exit(code)
    return pid


def check(directory: Path, last_done: int | None) -> tuple[int | None, str | None]:
    """(step of latest, problem or None) as a fresh process would see it."""
    resume.VERIFIED.clear()
    mgr = CheckpointManager(directory)
    latest = mgr.latest()
    if latest is None:
        return None, "unloadable" if last_done is not None else None
    fresh = State()
    try:
        r = mgr.restore(latest, {"model": fresh.model, "optimizer": OptimizerState(fresh.model, fresh.opt),
                                 "scheduler": fresh.sched, "trainer": {}})
    except (CheckpointError, OSError, RuntimeError) as e:
        return None, f"unloadable: {e}"
    step = r.step
    if r.states["trainer"].get("step") != step or float(fresh.model.fc.bias[0].detach()) != float(step) \
            or r.restored != ["model", "optimizer", "scheduler", "trainer"]:
        return step, f"wrong contents in step-{step}"
    if last_done is not None and step < last_done:
        return step, f"lost: latest is step-{step} but step-{last_done} had completed"
    return step, None


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def kills(n: int, work: Path, rng: random.Random, *, background: bool = False) -> dict[str, Any]:
    """Property (a); ``background``: with asynchronous saves (kills land in the snapshot, in the background
    write while training changes the state, and in the flush)."""
    directory = work / ("kills-async" if background else "kills")
    mgr = CheckpointManager(directory, keep_last=3)
    state = State()
    # calibrate: the duration of an uninterrupted save (median of 3)
    durations = []
    for step in (1, 2, 3):
        t = time.perf_counter()
        pid = save_in_child(mgr, state, step, background=background)
        _, status = os.waitpid(pid, 0)
        durations.append(time.perf_counter() - t)
        assert os.waitstatus_to_exitcode(status) == 0
    save_s = sorted(durations)[1]
    last_done, step = 3, 3
    unloadable = lost = completed_before_kill = left_temps = uncleaned = in_flight = 0
    problems: list[str] = []
    delays = []
    for _ in range(n):
        step += 1
        delay = rng.uniform(0, 1.25 * save_s)
        delays.append(delay)
        r, w = os.pipe()
        pid = save_in_child(mgr, state, step, background=background, signal_fd=w)
        os.close(w)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            returned = f.read() == b"s"  # save() had returned: the background write was under way
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            last_done = step
            completed_before_kill += 1
        elif returned:
            in_flight += 1
        if temps(directory):
            left_temps += 1
        got, problem = check(directory, last_done)
        if problem:
            problems.append(f"kill after {delay:.3f}s of step-{step}: {problem}")
            unloadable += problem.startswith("unloadable")
            lost += not problem.startswith("unloadable")
    # one clean save at the end must remove every temp any kill left
    step += 1
    pid = save_in_child(mgr, state, step, background=background)
    _, status = os.waitpid(pid, 0)
    uncleaned = len(temps(directory))
    return {"kills": n, "background": background, "killed_while_writing_in_background": in_flight if background else None,
            "save_s": save_s, "delay_max_s": max(delays) if delays else 0,
            "completed_before_kill": completed_before_kill, "kills_that_left_temps": left_temps,
            "temps_after_next_save": uncleaned, "unloadable_latest": unloadable, "lost_completed": lost,
            "problems": problems[:10], "entry_bytes": sum(p.stat().st_size for p in (directory / f"step-{step}").iterdir())}


def _disk_full_trial(directory: Path, state: State, *, limit: int | None) -> tuple[str | None, str]:
    """Save step 1 (must fit), then step 2 (must fail). Returns (problem, the error line)."""
    mgr = CheckpointManager(directory, keep_last=3)
    state.stamp(1)
    mgr.save(1, state.components())
    before = {p: p.read_bytes() for p in sorted((directory / "step-1").iterdir())}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        line = "saved without error"
        try:
            if limit is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            state.stamp(2)
            mgr.save(2, state.components())
        except CheckpointError as e:
            line = "error: " + str(e)
        except BaseException as e:  # noqa: BLE001 - reported as a failure of the trial
            line = f"UNEXPECTED {type(e).__name__}: {e}"
        os.write(w, line.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        line = f.read().decode()
    os.waitpid(pid, 0)
    if not line.startswith("error: ") or "\n" in line:
        return f"not one error line: {line!r}", line
    if "still points to step-1" not in line or ("ulimit -f" not in line and "free disk space" not in line):
        return f"the line does not name what was kept and the fix: {line!r}", line
    after = {p: p.read_bytes() for p in sorted((directory / "step-1").iterdir())}
    if after != before:
        return "step-1 changed", line
    got, problem = check(directory, 1)
    if problem or got != 1:
        return f"latest after the failure: step-{got}, {problem}", line
    if temps(directory):
        return f"temps left: {temps(directory)}", line
    return None, line


def disk_full(n: int, work: Path, rng: random.Random) -> dict[str, Any]:
    state = State()
    probe = work / "probe"
    CheckpointManager(probe).save(1, (state.stamp(1), state.components())[1])
    entry = sum(p.stat().st_size for p in (probe / "step-1").iterdir())
    files = {p.name: p.stat().st_size for p in (probe / "step-1").iterdir()}
    shutil.rmtree(probe)
    out: dict[str, Any] = {"entry_bytes": entry, "files": files}
    # RLIMIT_FSIZE: any limit below the largest file fails; draw between 1 byte and that size
    fsize = {"trials": n, "failed": 0, "problems": [], "lines": []}
    for i in range(n):
        d = work / f"fsize-{i}"
        limit = rng.randint(1, max(files.values()) - 1)
        problem, line = _disk_full_trial(d, state, limit=limit)
        fsize["lines"].append(line[:200])
        if problem:
            fsize["failed"] += 1
            fsize["problems"].append(f"limit {limit}: {problem}")
        shutil.rmtree(d, ignore_errors=True)
    out["rlimit_fsize"] = fsize
    tmpfs = {"trials": 0, "failed": 0, "problems": [], "lines": [], "not_run": None}
    for i in range(n):
        mnt = work / f"tmpfs-{i}"
        mnt.mkdir()
        # room for step-1 plus a random part of step-2 (tmpfs rounds to pages: leave 64 KiB per file of slack)
        slack = 64 * 1024 * (len(files) + 2)
        size = entry + slack + rng.randint(0, entry - 2 * slack)
        mounted = os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True).returncode == 0
        if not mounted:
            tmpfs["not_run"] = "needs root and mount rights"
            break
        try:
            tmpfs["trials"] += 1
            problem, line = _disk_full_trial(mnt / "ckpt", state, limit=None)
            tmpfs["lines"].append(line[:200])
            if problem:
                tmpfs["failed"] += 1
                tmpfs["problems"].append(f"size {size}: {problem}")
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    out["tmpfs"] = tmpfs
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 kills, 5 async kills and 2+2 disk-full trials")
    ap.add_argument("--kills", type=int, default=None)
    ap.add_argument("--async-kills", type=int, default=None,
                    help="kills of asynchronous saves (default 100; --quick: 5)")
    ap.add_argument("--disk-trials", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp-dir", default=None, help="scratch directory (default: a temp dir under bench/results)")
    args = ap.parse_args()
    n_kills = args.kills or (10 if args.quick else 100)
    n_async = args.async_kills if args.async_kills is not None else (5 if args.quick else 100)
    n_disk = args.disk_trials or (2 if args.quick else 10)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    root = Path(args.tmp_dir) if args.tmp_dir else Path(__file__).resolve().parent / "results"
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="faults_save.", dir=root))
    result: dict[str, Any] = {"machine": machine(), "uptime_before": uptime("before"), "quick": args.quick,
                              "seed": args.seed}
    try:
        t = time.perf_counter()
        result["kills"] = kills(n_kills, work, rng)
        result["kills"]["wall_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        result["kills_async"] = kills(n_async, work, rng, background=True)
        result["kills_async"]["wall_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        result["disk_full"] = disk_full(n_disk, work, rng)
        result["disk_full"]["wall_s"] = round(time.perf_counter() - t, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["uptime_after"] = uptime("after")
    k, d = result["kills"], result["disk_full"]
    print(f"(a) {k['kills']} SIGKILLs during CheckpointManager.save of ResNet-18 + AdamW "
          f"({k['entry_bytes']:,} bytes per entry, save {k['save_s']:.3f} s, delays 0-{k['delay_max_s']:.3f} s): "
          f"{k['unloadable_latest']} unloadable latest, {k['lost_completed']} completed checkpoints lost; "
          f"{k['completed_before_kill']} saves had returned before their kill, {k['kills_that_left_temps']} kills "
          f"left temps, {k['temps_after_next_save']} remained after the next save")
    for p in k["problems"]:
        print("    " + p)
    ka = result["kills_async"]
    print(f"(a, async) {ka['kills']} SIGKILLs during asynchronous saves (save + flush {ka['save_s']:.3f} s, delays "
          f"0-{ka['delay_max_s']:.3f} s; {ka['killed_while_writing_in_background']} while the background write was in "
          f"flight and training had changed the state): {ka['unloadable_latest']} unloadable latest, "
          f"{ka['lost_completed']} completed checkpoints lost; {ka['completed_before_kill']} flushes had returned, "
          f"{ka['kills_that_left_temps']} kills left temps, {ka['temps_after_next_save']} remained after the next save")
    for p in ka["problems"]:
        print("    " + p)
    for name in ("rlimit_fsize", "tmpfs"):
        x = d[name]
        print(f"(d) disk full, {name}: {x['trials']} trials, {x['failed']} failed"
              + (f" (not run: {x['not_run']})" if x.get("not_run") else ""))
        for p in x["problems"]:
            print("    " + p)
    if d["rlimit_fsize"]["lines"]:
        print("    e.g. " + d["rlimit_fsize"]["lines"][0])
    if d["tmpfs"]["lines"]:
        print("    e.g. " + d["tmpfs"]["lines"][0])
    write_result("faults_save_quick" if args.quick else "faults_save", result)
    ok = (k["unloadable_latest"] == 0 and k["lost_completed"] == 0 and k["temps_after_next_save"] == 0
          and ka["unloadable_latest"] == 0 and ka["lost_completed"] == 0 and ka["temps_after_next_save"] == 0
          and d["rlimit_fsize"]["failed"] == 0 and d["tmpfs"]["failed"] == 0)
    print("targets: " + ("met" if ok else "MISSED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
