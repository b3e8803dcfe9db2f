"""2-rank DDP on CPU: steady-state step time of scripts/train.py vs the minimal torchrun+DDP loop.

Target: ours <= 1.05 x the minimal loop (bench/minimal_ddp.py), same model, data, global batch and steps.

Three programs are launched with ``torchrun --standalone --nproc_per_node=2`` (``OMP_NUM_THREADS=1``,
one core per rank), alternately, ``--runs`` times each (>= 3), the order rotated every round:

- ``minimal``: bench/minimal_ddp.py, the hand-written loop; rank 0 prints the time of every step.
- ``ours (train.py)``: the real ``scripts/train.py --strategy ddp`` CLI, unchanged. Its step time comes
  from metrics.csv: each row's ``throughput`` is samples/s over the ``--log-every`` window ending at that
  step, so a window's time is ``window_steps * batch / throughput``. (Windows include the scalar loss
  all-reduce at each window's end: part of our loop.)
- ``ours (Trainer)``: bench/_ours_ddp.py builds the Trainer exactly as train.main() does and times every
  ``train_step`` like the minimal loop (finer than metrics.csv windows; nothing in train.py changes).

Steady state: the steps after ``--warmup`` (default 4) up to ``--steps`` (default 22 = one epoch of
digits at global batch 64, so no evaluation falls inside a metrics.csv window). Per run the steady step
time is (time of those steps) / (their number); reported per program: the median over runs, min/max,
and the ratio to the minimal loop (median of runs, plus the per-round paired ratios).

    .venv/bin/python bench/ddp_step.py --quick    # 1 run each, 8 steps: checks the plumbing (~1-2 min)
    .venv/bin/python bench/ddp_step.py            # 6 runs each, 22 steps (~7 min on 2 cores)

Writes bench/results/ddp_step.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

from _common import PYTHON, REPO, machine, noisy, ratio, remove, scratch_dir, summarize, table, uptime, verdict, write_result

TARGET = 1.05
MINIMAL, OURS_CLI, OURS_TRAINER = "minimal DDP loop", "ours (scripts/train.py)", "ours (Trainer.train_step)"


def torchrun_cmd() -> list[str]:
    exe = Path(PYTHON).parent / "torchrun"
    return [str(exe)] if exe.exists() else [PYTHON, "-m", "torch.distributed.run"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 run each, 8 steps, warm-up 2")
    p.add_argument("--runs", type=int, default=None, help="launches per program (default 6; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per launch (default 22; quick 8)")
    p.add_argument("--warmup", type=int, default=None, help="first steps excluded (default 4; quick 2)")
    p.add_argument("--log-every", type=int, default=2, help="train.py --log-every (metrics.csv window)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--data", default="digits")
    p.add_argument("--batch-size", type=int, default=64, help="GLOBAL batch")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--no-trainer", action="store_true", help="skip the bench/_ours_ddp.py program")
    p.add_argument("--tmp-dir", default=None)
    p.add_argument("--timeout", type=int, default=600, help="seconds per launch")
    return p


def launch(cmd: list[str], env: dict[str, str], timeout: int) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc, wall


def json_line(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{") and '"step_s"' in line:
            return json.loads(line)
    raise RuntimeError(f"no JSON result line in output:\n{text[-3000:]}")


def steady_from_steps(step_s: list[float], warmup: int, steps: int) -> dict[str, Any]:
    xs = step_s[warmup:steps]
    return {"steady_s": sum(xs) / len(xs), "median_step_s": statistics.median(xs), "steps_used": len(xs),
            "first_steps_s": step_s[:warmup]}


def steady_from_metrics(csv_path: Path, batch: int, warmup: int, steps: int) -> dict[str, Any]:
    windows = []
    prev = 0
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("throughput"):
                continue  # evaluation rows
            step = int(row["step"])
            n = step - prev
            windows.append((prev + 1, step, n * batch / float(row["throughput"])))
            prev = step
    used = [(a, b, t) for a, b, t in windows if a > warmup and b <= steps]
    if not used:
        raise RuntimeError(f"{csv_path}: no metrics.csv window after step {warmup}: lower --log-every or raise --steps")
    n = sum(b - a + 1 for a, b, _ in used)
    return {"steady_s": sum(t for *_, t in used) / n, "median_step_s": statistics.median(t / (b - a + 1) for a, b, t in used),
            "steps_used": n, "windows": [[a, b, t] for a, b, t in windows]}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    q = args.quick
    runs = args.runs or (1 if q else 6)
    steps = args.steps or (8 if q else 22)
    warmup = args.warmup if args.warmup is not None else (2 if q else 4)
    if steps - warmup < args.log_every:
        raise SystemExit("error: --steps minus --warmup must cover at least one --log-every window")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": "",
           "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    tr = torchrun_cmd() + ["--standalone", f"--nproc_per_node={args.nproc}"]
    common = ["--model", args.model, "--data", args.data, "--batch-size", str(args.batch_size)]
    work = scratch_dir(".ddp_step-", args.tmp_dir)
    programs = [MINIMAL, OURS_CLI] + ([] if args.no_trainer else [OURS_TRAINER])
    result: dict[str, Any] = {"bench": "ddp_step", "quick": q, "machine": machine(), "argv": sys.argv,
                              "config": {"runs": runs, "steps": steps, "warmup": warmup, "log_every": args.log_every,
                                         "nproc": args.nproc, "model": args.model, "data": args.data,
                                         "global_batch": args.batch_size, "OMP_NUM_THREADS": args.threads},
                              "commands": {}, "uptime": []}
    per: dict[str, list[dict[str, Any]]] = {p: [] for p in programs}
    result["uptime"].append(uptime("before"))
    try:
        for r in range(runs):
            # rotate the order each round (A B C, B C A, C A B, ...): no program always follows the same one
            for prog in programs[r % len(programs):] + programs[:r % len(programs)]:
                out_dir = work / f"run{r}-{len(per[prog])}-{prog.split()[1].strip('(').strip(')').replace('.', '')}"
                if prog == MINIMAL:
                    cmd = tr + [str(HERE / "minimal_ddp.py"), *common, "--steps", str(steps)]
                elif prog == OURS_CLI:
                    cmd = tr + [str(REPO / "scripts" / "train.py"), "--strategy", "ddp", *common, "--max-steps", str(steps),
                                "--log-every", str(args.log_every), "--output-dir", str(out_dir), "--no-tensorboard",
                                "--no-progress"]
                else:
                    cmd = tr + [str(HERE / "_ours_ddp.py"), "--steps", str(steps), "--", "--strategy", "ddp", *common,
                                "--max-steps", str(steps), "--output-dir", str(out_dir), "--no-tensorboard", "--no-progress"]
                result["commands"].setdefault(prog, "OMP_NUM_THREADS=%d " % args.threads + " ".join(
                    c if c != str(out_dir) else "OUTDIR" for c in cmd).replace(str(REPO) + "/", ""))
                proc, wall = launch(cmd, env, args.timeout)
                if prog == OURS_CLI:
                    s = steady_from_metrics(out_dir / "metrics.csv", args.batch_size, warmup, steps)
                    summary = json.loads((out_dir / "summary.json").read_text())
                    if summary.get("world_size") != args.nproc or summary.get("steps") != steps:
                        raise RuntimeError(f"train.py summary says world {summary.get('world_size')}, steps {summary.get('steps')}")
                else:
                    data = json_line(proc.stdout)
                    if data["world_size"] != args.nproc or data["steps"] != steps:
                        raise RuntimeError(f"{prog}: world {data['world_size']}, steps {data['steps']}")
                    s = steady_from_steps(data["step_s"], warmup, steps)
                    s["step_s"] = data["step_s"]
                s["wall_s"] = wall
                per[prog].append(s)
                remove(out_dir)
                print(f"  run {r + 1}/{runs} {prog}: steady {s['steady_s'] * 1e3:.1f} ms/step "
                      f"(median step {s['median_step_s'] * 1e3:.1f} ms, {s['steps_used']} steps), launch {wall:.1f}s",
                      flush=True)
    finally:
        remove(work)
    result["uptime"].append(uptime("after"))
    base = [s["steady_s"] for s in per[MINIMAL]]
    rows = []
    for prog in programs:
        xs = [s["steady_s"] for s in per[prog]]
        st, rr = summarize(xs), ratio(xs, base)
        rows.append({"program": prog, "median_ms": st["median"] * 1e3, "min_ms": st["min"] * 1e3, "max_ms": st["max"] * 1e3,
                     "spread": st["spread"], "ratio": rr["ratio"], "paired_median": rr["paired_median"],
                     "paired_min": rr["paired_min"], "paired_max": rr["paired_max"],
                     "samples_s": args.batch_size / st["median"], "runs": per[prog]})
    print(table(rows, [("program", "program", ""), ("median_ms", "median ms/step", ".1f"), ("min_ms", "min", ".1f"),
                       ("max_ms", "max", ".1f"), ("spread", "spread", ".0%"), ("samples_s", "samples/s", ".0f"),
                       ("ratio", "ratio", ".3f"), ("paired_median", "paired med", ".3f"),
                       ("paired_min", "paired min", ".3f"), ("paired_max", "paired max", ".3f")]))
    result["rows"] = rows
    result["target"] = TARGET
    for row in rows[1:]:
        key = "cli" if row["program"] == OURS_CLI else "trainer"
        result[f"ratio_{key}"] = row["ratio"]
        result[f"verdict_{key}"] = verdict(row["ratio"], TARGET)
        print(f"{row['program']} / minimal = {row['ratio']:.3f} (paired median {row['paired_median']:.3f}, "
              f"min {row['paired_min']:.3f}, max {row['paired_max']:.3f}); target <= {TARGET}: "
              f"{verdict(row['ratio'], TARGET)}" + (" (QUICK mode)" if q else ""))
    result["noisy"] = noisy(result["uptime"])
    if result["noisy"]:
        print("note: load average was > 1 during the run (shared machine): expect extra spread")
    write_result("ddp_step", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
