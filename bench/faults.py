"""Fault trials for scripts/train.py under real torchrun: restarts after a SIGKILL, preemption by SIGTERM.

    python bench/faults.py            # 10 restart trials, 10 SIGTERM trials (5 to a worker, 5 to torchrun)
    python bench/faults.py --quick    # 1 + 2 trials: what tests/test_faults.py runs
    python bench/faults.py --restarts 0 --sigterms 0 --shrinks 5   # only the world-size change trials

(b) restart: torchrun --standalone --nproc_per_node=2 --max-restarts=1, one worker SIGKILLed at a random
    point after the first checkpoint -> the run must finish (exit 0), log ``restart 1: resuming from step-K``,
    and its final weights must equal an uninterrupted run's within 1e-5 relative.
(c) SIGTERM to one worker, or to the torchrun agent (--max-restarts=0) -> every rank exits 143 with a
    checkpoint; ``--resume auto`` then finishes the run, and the per-step losses of the two launches equal
    the uninterrupted run's exactly.
(b') shrink: two torchrun agents on this host (--nnodes=1:2, c10d rendezvous, one worker each), one agent and
    its worker SIGKILLed after the first checkpoint -> the other agent forms a world of 1, resumes the
    checkpoint at the same sample cursor and finishes; per-step losses and final weights within 1e-5
    relative of an uninterrupted world-2 run (no dropout: its masks depend on the world size).
Restart latency: SIGKILL -> first step logged by the restarted group, against a fresh launch's start ->
first step, measured in the same trials (ratio printed; docs/reliability.md has the figures).

The model is the MLP with dropout 0.2 on the digits (400 samples), so the trials also check that per-step
seeding reproduces the dropout masks after a resume.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import free_port

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "scripts" / "train.py")
BIN = Path(sys.executable).parent
PREEMPTED = 143

# 320 training samples: 20 steps per epoch x 4 epochs, a checkpoint every 10 steps, a loss row every step
MODEL_ARGS = ["--model", "mlp", "--model-arg", "dropout=0.2", "--model-arg", "hidden=512", "--data", "digits",
              "--num-samples", "400", "--batch-size", "16", "--epochs", "4", "--save-every", "10",
              "--log-every", "1", "--strategy", "ddp", "--no-progress", "--no-tensorboard", "--seed", "3"]
TOTAL_STEPS = 80
# the world-size change: no dropout (each rank draws masks for its own slice, and the slices change)
SHRINK_ARGS = [a for a in MODEL_ARGS if a not in ("dropout=0.2",)]
del SHRINK_ARGS[SHRINK_ARGS.index("--model-arg")]
# short rendezvous timeouts, so a lost node is noticed in ~2 s and a round closes 3 s after its last join
RDZV_CONF = "join_timeout=60,last_call_timeout=3,close_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=2"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "GROUP_", "MASTER_", "TORCHELASTIC", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore::UserWarning",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def torchrun(out: Path, *, restarts: int, extra: list[str] = (), model_args: list[str] = MODEL_ARGS,
             launch: list[str] = ("--standalone", "--nproc_per_node=2"), log_name: str | None = None,
             env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start torchrun (x2 standalone by default) on scripts/train.py (its own session, so a timeout can kill
    the whole tree)."""
    cmd = [str(BIN / "torchrun"), *launch, f"--max-restarts={restarts}",
           "--monitor-interval=0.1", TRAIN, *model_args, "--output-dir", str(out), *extra]
    log = open(out.parent / f"{log_name or out.name}.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, env={**_env(), **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -9


def log_text(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()


def workers(proc: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of torchrun's live train.py workers."""
    import psutil

    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if TRAIN in child.cmdline():
                found[int(child.environ()["RANK"])] = child.pid
        except (psutil.Error, KeyError, ValueError):
            continue
    return found


def wait_for(pred, timeout: float, every: float = 0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    return None


def logged_steps(out: Path) -> dict[int, float]:
    """Step -> loss from metrics.csv; the LAST row of a step wins (a restarted group logs some steps again)."""
    path = out / "metrics.csv"
    if not path.is_file():
        return {}
    rows = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("loss"):
                rows[int(row["step"])] = float(row["loss"])
    return rows


def rows_count(out: Path) -> int:
    try:
        with open(out / "metrics.csv") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def final_weights(out: Path) -> dict:
    import checkpoint

    return checkpoint.load_state_dict(out / "checkpoints" / f"step-{TOTAL_STEPS}")


def max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).norm() / max(b[k].double().norm(), 1e-12)) for k in a)


def reference(root: Path, timeout: float, model_args: list[str] = MODEL_ARGS, name: str = "reference") -> dict:
    """An uninterrupted run: its final weights, per-step losses and time from launch to its first step."""
    out = root / name
    t0 = time.monotonic()
    proc = torchrun(out, restarts=0, model_args=model_args)
    first = wait_for(lambda: rows_count(out) > 1, timeout)
    to_first_step = time.monotonic() - t0 if first else None
    rc = finish(proc, timeout)
    if rc != 0:
        raise RuntimeError(f"reference run failed ({rc}):\n{log_text(out)[-3000:]}")
    return {"weights": final_weights(out), "losses": logged_steps(out), "to_first_step_s": to_first_step}


def fresh_to_first_step(root: Path, ref: dict, n: int, timeout: float, model_args: list[str] = MODEL_ARGS) -> float:
    """Median launch -> first step of ``n`` fresh launches (the reference run's and ``n - 1`` more, each stopped
    after its first step): the denominator of the latency ratios, which one launch makes noisy (4.1-5.1 s)."""
    samples = [ref["to_first_step_s"]]
    for i in range(n - 1):
        out = root / f"fresh-{len(model_args)}-{i}"
        t0 = time.monotonic()
        proc = torchrun(out, restarts=0, model_args=model_args)
        if wait_for(lambda: rows_count(out) > 1, timeout):
            samples.append(time.monotonic() - t0)
        import psutil

        for p in (psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)):
            try:  # the workers too: torchrun starts them in sessions of their own
                p.kill()
            except psutil.Error:
                pass
        proc.wait()
    return statistics.median(s for s in samples if s is not None)


def trial_restart(root: Path, i: int, ref: dict, rng: random.Random, timeout: float) -> dict:
    """(b): SIGKILL one worker at a random moment after the first checkpoint; the restarted group must finish."""
    out = root / f"restart-{i}"
    proc = torchrun(out, restarts=1)
    result = {"trial": i, "ok": False}
    if not wait_for(lambda: (out / "checkpoints" / "latest").is_file(), timeout):
        finish(proc, 1)
        return {**result, "why": "no checkpoint appeared"}
    time.sleep(rng.uniform(0, 0.05))  # a random step after the first checkpoint
    pids = workers(proc)
    victim = rng.choice(sorted(pids))
    steps_before = max(logged_steps(out) or [0])
    os.kill(pids[victim], signal.SIGKILL)
    killed = time.monotonic()
    # the restarted group's first step: the first row logged after its workers announced the restart
    # (by then every worker of the killed group is gone, so no late row of theirs is counted)
    latency = None
    if wait_for(lambda: "restart 1:" in log_text(out), timeout, 0.01):
        rows = rows_count(out)
        if wait_for(lambda: rows_count(out) > rows, timeout, 0.01):
            latency = time.monotonic() - killed
    rc = finish(proc, timeout)
    text = log_text(out)
    result.update(rank=victim, killed_after_step=steps_before, rc=rc, restart_latency_s=latency,
                  resumed_message="restart 1: resuming from step-" in text)
    if steps_before >= TOTAL_STEPS - 1:
        return {**result, "why": "the run ended before the kill landed (not a trial)", "ok": None}
    if rc != 0:
        return {**result, "why": f"torchrun exit {rc}: " + " | ".join(text.strip().splitlines()[-3:])[-400:]}
    result["max_rel_diff"] = max_rel_diff(final_weights(out), ref["weights"])
    result["ok"] = bool(result["resumed_message"] and result["max_rel_diff"] <= 1e-5)
    return result


def max_rel_loss_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys(), (sorted(set(a) ^ set(b)))
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in a)


def trial_shrink(root: Path, i: int, ref: dict, rng: random.Random, timeout: float,
                 env: dict[str, str] | None = None, rdzv_conf: str = RDZV_CONF) -> dict:
    """(b'): two agents (--nnodes=1:2), one killed with its worker after the first checkpoint: the survivor
    re-forms a world of 1 and finishes from the checkpoint."""
    out = root / f"shrink-{i}"
    port = free_port()

    def agent(name: str, host: bool) -> subprocess.Popen:
        launch = ["--nnodes=1:2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                  f"--rdzv_id=shrink-{i}", f"--rdzv_conf={rdzv_conf},is_host={str(host).lower()}"]
        return torchrun(out, restarts=1, model_args=SHRINK_ARGS, launch=launch, log_name=f"{out.name}-{name}", env=env)

    # the agent that stays hosts the rendezvous (is_host); the other starts first so both join one round
    leaving = agent("leaving", host=False)
    time.sleep(1.0)
    staying = agent("staying", host=True)
    result = {"trial": i, "ok": False}
    if not wait_for(lambda: (out / "checkpoints" / "latest").is_file(), timeout):
        for p in (leaving, staying):
            finish(p, 1)
        return {**result, "why": "no checkpoint appeared"}
    time.sleep(rng.uniform(0, 0.05))
    steps_before = max(logged_steps(out) or [0])
    import psutil

    tree = psutil.Process(leaving.pid).children(recursive=True)  # torchrun starts its workers in new sessions
    for p in (psutil.Process(leaving.pid), *tree):  # the node is gone: its agent and its worker at once
        try:
            p.kill()
        except psutil.Error:
            pass
    killed = time.monotonic()
    leaving.wait()
    log = out.parent / f"{out.name}-staying.log"
    latency = resumed_s = None
    if wait_for(lambda: "restart 1:" in log.read_text(), timeout, 0.01):
        resumed_s = time.monotonic() - killed  # the new round formed, a worker started and chose its checkpoint
        rows = rows_count(out)
        if wait_for(lambda: rows_count(out) > rows, timeout, 0.01):
            latency = time.monotonic() - killed
    rc = finish(staying, timeout)
    text = log.read_text()
    result.update(killed_after_step=steps_before, rc=rc, restart_latency_s=latency, to_resume_message_s=resumed_s,
                  rdzv_conf=rdzv_conf,
                  resumed_message="restart 1: resuming from step-" in text)
    if steps_before >= TOTAL_STEPS - 1:
        return {**result, "why": "the run ended before the kill landed (not a trial)", "ok": None}
    if rc != 0:
        return {**result, "why": f"torchrun exit {rc}: " + " | ".join(text.strip().splitlines()[-3:])[-400:]}
    summary = json.loads((out / "summary.json").read_text())
    result.update(final_world_size=summary["world_size"],
                  max_rel_diff=max_rel_diff(final_weights(out), ref["weights"]),
                  max_rel_loss_diff=max_rel_loss_diff(logged_steps(out), ref["losses"]))
    result["ok"] = bool(result["resumed_message"] and summary["world_size"] == 1 and result["max_rel_diff"] <= 1e-5
                        and result["max_rel_loss_diff"] <= 1e-5)
    return result


def trial_sigterm(root: Path, i: int, target: str, ref: dict, rng: random.Random, timeout: float,
                  extra: list[str] = ()) -> dict:
    """(c): SIGTERM to one worker or to torchrun -> exit 143 with a checkpoint; --resume auto continues exactly.
    ``extra``: more train.py flags for both launches (e.g. --workers 2)."""
    out = root / f"sigterm-{target}-{i}"
    proc = torchrun(out, restarts=0, extra=list(extra))
    result = {"trial": i, "target": target, "ok": False}
    if not wait_for(lambda: (out / "checkpoints" / "latest").is_file(), timeout):
        finish(proc, 1)
        return {**result, "why": "no checkpoint appeared"}
    time.sleep(rng.uniform(0, 0.05))
    if target == "agent":
        os.kill(proc.pid, signal.SIGTERM)
    else:
        os.kill(workers(proc)[rng.choice([0, 1])], signal.SIGTERM)
    signalled = time.monotonic()
    rc = finish(proc, timeout)
    text = log_text(out)
    import checkpoint

    latest = checkpoint.CheckpointManager(out / "checkpoints").latest()
    stopped_at = checkpoint.read_manifest(latest)["step"] if latest else None
    result.update(rc=rc, stopped_at=stopped_at, exit_143_logged="exiting 143" in text,
                  signal_to_exit_s=round(time.monotonic() - signalled, 3))
    if stopped_at == TOTAL_STEPS:
        return {**result, "why": "the run ended before the signal landed (not a trial)", "ok": None}
    first = logged_steps(out)
    resumed = torchrun(out, restarts=0, extra=[*extra, "--resume", "auto"])
    rc2 = finish(resumed, timeout)
    both = {**first, **logged_steps(out)}
    result.update(resume_rc=rc2, steps_logged=len(both))
    result["losses_equal"] = both == ref["losses"]
    result["ok"] = bool(rc != 0 and result["exit_143_logged"] and rc2 == 0 and result["losses_equal"]
                        and max_rel_diff(final_weights(out), ref["weights"]) == 0.0)
    return result


def run(restart_trials: int, sigterm_trials: int, *, root: Path, seed: int = 0, timeout: float = 240,
        shrink_trials: int = 0, rdzv_conf: str = RDZV_CONF, fresh_launches: int = 3) -> dict:
    rng = random.Random(seed)
    ref = reference(root, timeout) if restart_trials or sigterm_trials else {"to_first_step_s": None}
    restarts = [trial_restart(root, i, ref, rng, timeout) for i in range(restart_trials)]
    sigterms = [trial_sigterm(root, i, "worker" if i % 2 == 0 else "agent", ref, rng, timeout)
                for i in range(sigterm_trials)]
    shrinks = []
    if shrink_trials:
        ref_shrink = reference(root, timeout, SHRINK_ARGS, "reference-nodropout")
        shrinks = [trial_shrink(root, i, ref_shrink, rng, timeout, rdzv_conf=rdzv_conf) for i in range(shrink_trials)]
        shrink_lat = [r["restart_latency_s"] for r in shrinks if r.get("ok") and r.get("restart_latency_s")]
        shrink_fresh = fresh_to_first_step(root, ref_shrink, fresh_launches, timeout, SHRINK_ARGS)
    lat = [r["restart_latency_s"] for r in restarts if r.get("ok") and r.get("restart_latency_s")]
    fresh = fresh_to_first_step(root, ref, fresh_launches, timeout) if restarts else ref["to_first_step_s"]
    return {
        "shrink": {"ok": sum(r["ok"] is True for r in shrinks), "trials": sum(r["ok"] is not None for r in shrinks),
                   "runs": shrinks,
                   "latency": {"fresh_to_first_step_s": shrink_fresh,
                               "restart_to_first_step_s": statistics.median(shrink_lat) if shrink_lat else None,
                               "ratio": statistics.median(shrink_lat) / shrink_fresh if shrink_lat else None}
                   if shrinks else None},
        "restart": {"ok": sum(r["ok"] is True for r in restarts), "trials": sum(r["ok"] is not None for r in restarts),
                    "runs": restarts},
        "sigterm": {"ok": sum(r["ok"] is True for r in sigterms), "trials": sum(r["ok"] is not None for r in sigterms),
                    "runs": sigterms},
        "latency": {"fresh_to_first_step_s": fresh, "restart_to_first_step_s": statistics.median(lat) if lat else None,
                    "ratio": (statistics.median(lat) / fresh) if lat and fresh else None},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 restart trial and 2 SIGTERM trials (worker, agent)")
    p.add_argument("--restarts", type=int, default=10)
    p.add_argument("--sigterms", type=int, default=10)
    p.add_argument("--shrinks", type=int, default=5, help="world-size change trials (two agents, one killed)")
    p.add_argument("--rdzv-conf", default=RDZV_CONF,
                   help="c10d rendezvous settings of the world-size change trials (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    n_restart, n_term, n_shrink = (1, 2, 1) if args.quick else (args.restarts, args.sigterms, args.shrinks)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory(prefix="anytopo-faults-") as tmp:
        res = run(n_restart, n_term, root=Path(tmp), seed=args.seed, shrink_trials=n_shrink,
                  rdzv_conf=args.rdzv_conf, fresh_launches=1 if args.quick else 3)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    for r in res["restart"]["runs"] + res["sigterm"]["runs"] + res["shrink"]["runs"]:
        print(json.dumps(r))
    lat = res["latency"]
    print(f"(b) restarts: {res['restart']['ok']}/{res['restart']['trials']} finished with weights within 1e-5")
    print(f"(c) SIGTERM: {res['sigterm']['ok']}/{res['sigterm']['trials']} checkpointed, exited 143, resumed exactly")
    if res["shrink"]["runs"]:
        sl = res["shrink"]["latency"]
        print(f"(b') world 2 -> 1: {res['shrink']['ok']}/{res['shrink']['trials']} finished on the smaller world "
              "with losses and weights within 1e-5")
        if sl["ratio"] is not None:
            print(f"world-change latency: SIGKILL -> first step {sl['restart_to_first_step_s']:.2f} s (median), fresh "
                  f"launch -> first step {sl['fresh_to_first_step_s']:.2f} s: ratio {sl['ratio']:.2f}")
    if lat["ratio"] is not None:
        print(f"restart latency: SIGKILL -> first step {lat['restart_to_first_step_s']:.2f} s (median), fresh launch -> "
              f"first step {lat['fresh_to_first_step_s']:.2f} s: ratio {lat['ratio']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    ok = all(res[k]["ok"] == res[k]["trials"] for k in ("restart", "sigterm", "shrink"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
