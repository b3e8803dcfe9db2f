"""Hung and slow ranks under real torchrun: how fast the watchdog finds a hang, and what it costs.

    python bench/hangs.py                 # detection latency at --hang-timeout 10/20/30 (3 trials each) and the
                                          # watchdog's cost on step time (32 alternating blocks in one job)
    python bench/hangs.py --quick         # 1 trial at 10 s, 8 blocks
    python bench/hangs.py --latency 0     # only the cost
    python bench/hangs.py --pairs 6       # also 6 interleaved pairs of whole train.py runs, on and off

(1) Detection latency: torchrun --standalone --nproc_per_node=2 on the MLP (scripts/train.py through
    bench/_hang_worker.py), rank 1 SIGSTOPped after the first checkpoint; latency = SIGSTOP -> the verdict's
    report.txt on disk, and SIGSTOP -> torchrun exited. The bound the tests assert is --hang-timeout + 10 s.
(2) Cost, side by side in one job (bench/_watchdog_cost.py under torchrun x2): the trainer's step (ResNet-18,
    DDP, the same phase marks) in blocks of 20 steps, the watchdog started and stopped between blocks in ABBA
    order; cost = median(on blocks) / median(off blocks) - 1, with the median of the ABBA groups' ratios
    beside it. Also: the CPU time the watchdog thread itself used over the on blocks' wall time (a bound on the
    interpreter time it can take from training), and one Watchdog.phase() call (timeit) times the 5 calls per
    step against the step time. --pairs N adds whole train.py runs (--hang-timeout 60 vs 0) alternated, each
    run's step time the median of its metrics rows' window seconds per step (warm-up row left out): the
    end-to-end check, noisier on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import faults

REPO = Path(__file__).resolve().parent.parent
WORKER = str(REPO / "bench" / "_hang_worker.py")
# faults.MODEL_ARGS (MLP with dropout on the digits, a checkpoint every 10 steps) for 200 epochs: a hang lands mid-run
LONG_ARGS = [a if a != "4" else "200" for a in faults.MODEL_ARGS]
COST_ARGS = ["--model", "resnet18", "--data", "digits", "--batch-size", "32", "--max-steps", "60", "--log-every", "5",
             "--strategy", "ddp", "--no-progress", "--no-tensorboard", "--seed", "1"]


def launch(out: Path, *, fault: str | None = None, restarts: int = 0, model_args: list[str] = LONG_ARGS,
           extra: list[str] = ()) -> subprocess.Popen:
    """``python -m launcher.torchrun --standalone --nproc_per_node=2`` on bench/_hang_worker.py (scripts/train.py
    with ``fault`` injected, see its docstring), in a session of its own; output in ``out``.log."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "launcher.torchrun", "--standalone", "--nproc_per_node=2", f"--max-restarts={restarts}",
           "--monitor-interval=0.1", WORKER, *model_args, "--output-dir", str(out), *extra]
    env = {**faults._env(), **({"ANYTOPO_TEST_FAULT": fault} if fault else {})}
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def workers(proc: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the live training processes (not their DataLoader workers)."""
    import psutil

    found = {}
    for child in psutil.Process(proc.pid).children():  # the agent's own children: DataLoader workers are theirs
        try:
            found[int(child.environ()["RANK"])] = child.pid
        except (psutil.Error, KeyError, ValueError):
            continue
    return found


def reports(out: Path) -> list[Path]:
    return sorted((out / "hangs").glob("*/report.txt"))


def trial_sigstop(root: Path, name: str, hang_timeout: float, *, restarts: int = 0, model_args: list[str] = LONG_ARGS,
                  fault: str | None = None, at_step: int | None = None, timeout: float = 180) -> dict:
    """Rank 1 SIGSTOPped mid-training -- 1.5 s after the first checkpoint, or once step ``at_step`` is logged
    (``--log-every 1``) -- : when the verdict was on disk, when torchrun ended, what it said. With ``restarts``
    the restarted group must finish the run (exit 0)."""
    out = root / name
    proc = launch(out, restarts=restarts, model_args=model_args, fault=fault,
                  extra=["--hang-timeout", str(hang_timeout)])
    result: dict = {"hang_timeout": hang_timeout, "ok": False}
    found, pids, detected, ended = [], {}, None, None
    try:
        ready = ((lambda: max(faults.logged_steps(out) or [0]) >= at_step) if at_step else
                 (lambda: (out / "checkpoints" / "latest").is_file()))
        if not faults.wait_for(ready, timeout):
            return {**result, "why": "the run did not get there: " + (root / f"{name}.log").read_text()[-1500:]}
        pids = faults.wait_for(lambda: workers(proc) if len(workers(proc)) == 2 else None, 20)
        if not at_step:
            time.sleep(1.5)  # mid-training, with heartbeats published since the start (one a second)
        os.kill(pids[1], signal.SIGSTOP)
        stopped = time.monotonic()
        found = faults.wait_for(lambda: reports(out), hang_timeout + 60, 0.05) or []
        detected = time.monotonic() - stopped if found else None
        faults.wait_for(lambda: proc.poll() is not None, timeout if restarts else 60, 0.05)
        ended = time.monotonic() - stopped
    finally:
        rc = faults.finish(proc, 1)
    result.update(victim_pid=pids.get(1), rc=rc, detect_s=detected, exit_s=ended, out=str(out),
                  report=found[0].read_text().splitlines()[0] if found else None,
                  dir=str(found[0].parent) if found else None)
    result["ok"] = bool(found and detected <= hang_timeout + 10 and (rc == 0 if restarts else rc != 0))
    return result


def step_seconds(out: Path) -> float:
    """Median (window seconds / window steps) over the metrics rows of a run, the first row left out."""
    import csv

    rows = [r for r in csv.DictReader(open(out / "metrics.csv")) if r.get("throughput")]
    batch = int(COST_ARGS[COST_ARGS.index("--batch-size") + 1])
    return statistics.median(batch / float(r["throughput"]) for r in rows[1:])


def cost(root: Path, pairs: int, timeout: float = 600) -> dict:
    """Interleaved runs with the watchdog on and off: the ratio of their step times."""
    ratios, on, off = [], [], []
    for i in range(pairs):
        times = {}
        for arm, flag in (("on", "60"), ("off", "0")) if i % 2 == 0 else (("off", "0"), ("on", "60")):
            out = root / f"cost-{arm}-{i}"
            proc = launch(out, model_args=COST_ARGS, extra=["--hang-timeout", flag])
            if faults.finish(proc, timeout) != 0:
                raise RuntimeError(f"{out} failed:\n{(root / f'{out.name}.log').read_text()[-2000:]}")
            times[arm] = step_seconds(out)
        on.append(times["on"])
        off.append(times["off"])
        ratios.append(times["on"] / times["off"])
    return {"pairs": pairs, "ratios": ratios, "on_s": on, "off_s": off,
            "ratio_of_medians": statistics.median(on) / statistics.median(off), "median_ratio": statistics.median(ratios)}


def cost_blocks(root: Path, blocks: int, steps: int = 20, timeout: float = 900, null: bool = False) -> dict:
    """bench/_watchdog_cost.py under torchrun x2: per-block seconds per step with the watchdog on and off
    (``null``: never on, the A/A control)."""
    out = root / f"cost-blocks{'-null' if null else ''}.json"
    cmd = [sys.executable, "-m", "launcher.torchrun", "--standalone", "--nproc_per_node=2",
           str(REPO / "bench" / "_watchdog_cost.py"), str(out), str(blocks), str(steps), *(["null"] if null else [])]
    p = subprocess.run(cmd, cwd=REPO, env=faults._env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"the cost job failed:\n{p.stderr[-2000:]}")
    rows = json.loads(out.read_text())
    on = [r["s_per_step"] for r in rows if r["on"]]
    off = [r["s_per_step"] for r in rows if not r["on"]]
    groups = [rows[i:i + 4] for i in range(0, len(rows) - 3, 4)]  # on, off, off, on
    group_ratios = [(g[0]["s_per_step"] + g[3]["s_per_step"]) / (g[1]["s_per_step"] + g[2]["s_per_step"])
                    for g in groups]
    return {"blocks": blocks, "steps_per_block": steps, "rows": rows,
            "ratio_of_medians": statistics.median(on) / statistics.median(off),
            "median_group_ratio": statistics.median(group_ratios), "group_ratios": group_ratios,
            "on_s": statistics.median(on), "off_s": statistics.median(off),
            "thread_cpu_share": statistics.median(r["thread_cpu_share"] for r in rows if r["on"])}


def phase_call_cost() -> float:
    """Seconds per Watchdog.phase() call (the main thread's whole share of the watchdog)."""
    import launcher
    import torch

    info = launcher.DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                             device=torch.device("cpu"), backend=None, launcher="none", strategy="single")
    wd = launcher.Watchdog(info, report_dir=Path(tempfile.gettempdir()), timeout_s=None, startup_s=300)
    n = 200_000
    return timeit.timeit(lambda: wd.phase("forward", 1), number=n) / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 latency trial at 10 s, 2 cost pairs")
    p.add_argument("--latency", type=int, default=3, help="trials per timeout (0: none)")
    p.add_argument("--timeouts", type=float, nargs="+", default=[10, 20, 30])
    p.add_argument("--blocks", type=int, default=32, help="alternating blocks of 20 steps for the cost (0: none)")
    p.add_argument("--repeat", type=int, default=2, help="A/B block jobs, each followed by an A/A control job")
    p.add_argument("--pairs", type=int, default=0, help="interleaved on/off pairs of whole train.py runs")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    trials, timeouts, blocks, pairs = ((1, [10.0], 8, args.pairs) if args.quick else
                                       (args.latency, args.timeouts, args.blocks, args.pairs))
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    res: dict = {"latency": [], "cost": None, "blocks": None}
    with tempfile.TemporaryDirectory(prefix="anytopo-hangs-") as tmp:
        root = Path(tmp)
        for t in timeouts if trials else []:
            for i in range(trials):
                r = trial_sigstop(root, f"stop-{t:g}-{i}", t)
                res["latency"].append(r)
                print(json.dumps({k: r[k] for k in ("hang_timeout", "ok", "rc", "detect_s", "exit_s")}))
        for _ in range((1 if args.quick else args.repeat) if blocks else 0):  # A/B, then the A/A control, alternately
            res.setdefault("blocks_runs", []).append(cost_blocks(root, blocks))
            res.setdefault("null_runs", []).append(cost_blocks(root, blocks, null=True))
        if blocks:
            res["blocks"] = res["blocks_runs"][0]
        if pairs:
            res["cost"] = cost(root, pairs)
    res["phase_call_s"] = phase_call_cost()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    for t in timeouts if trials else []:
        rows = [r for r in res["latency"] if r["hang_timeout"] == t and r["detect_s"] is not None]
        if rows:
            d = [r["detect_s"] for r in rows]
            e = [r["exit_s"] for r in rows]
            print(f"--hang-timeout {t:g}: SIGSTOP -> verdict on disk {min(d):.1f}-{max(d):.1f} s (timeout + "
                  f"{min(d) - t:.1f}..{max(d) - t:.1f} s), -> torchrun exited {min(e):.1f}-{max(e):.1f} s; "
                  f"{sum(r['ok'] for r in rows)}/{len(rows)} within timeout + 10 s")
    for c, n in zip(res.get("blocks_runs", []), res.get("null_runs", [])):
        print(f"watchdog cost, {c['blocks']} alternating blocks of {c['steps_per_block']} DDP steps in one job: "
              f"{c['on_s'] * 1e3:.1f} ms per step on vs {c['off_s'] * 1e3:.1f} ms off, ratio of medians "
              f"{c['ratio_of_medians']:.4f}, median of the ABBA groups' ratios {c['median_group_ratio']:.4f} (groups: "
              f"{', '.join(f'{r:.3f}' for r in c['group_ratios'])}); the watchdog thread's own CPU time "
              f"{c['thread_cpu_share'] * 100:.3f} % of the wall time; Watchdog.phase() {res['phase_call_s'] * 1e9:.0f} ns "
              f"x 5 per step = {res['phase_call_s'] * 5 / c['off_s'] * 100:.4f} % of a step")
        print(f"  A/A control (watchdog never on, same alternation): ratio of medians {n['ratio_of_medians']:.4f}, "
              f"median group ratio {n['median_group_ratio']:.4f} (groups: "
              f"{', '.join(f'{r:.3f}' for r in n['group_ratios'])})")
    c = res["cost"]
    if c:
        print(f"watchdog cost on step time: median of per-pair ratios {c['median_ratio']:.4f}, ratio of medians "
              f"{c['ratio_of_medians']:.4f} (pairs: {', '.join(f'{r:.3f}' for r in c['ratios'])}); step "
              f"{statistics.median(c['off_s']) * 1e3:.1f} ms off, {statistics.median(c['on_s']) * 1e3:.1f} ms on "
              "(whole train.py runs)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    ok = all(r["ok"] for r in res["latency"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
