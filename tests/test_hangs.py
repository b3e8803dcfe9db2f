"""Hung and slow ranks (issue 21): the watchdog's verdicts, stragglers, preemption with DataLoader workers, and
saves sized to the scheduler's grace (docs/reliability.md, *Hung and slow ranks*).

The multi-process runs are bench/hangs.py's own trials (torchrun x2, gloo, faults injected by
bench/_hang_worker.py into an otherwise unchanged scripts/train.py). The SIGSTOP trial and the units run in
`make test`; the longer runs are marked slow (`make test-slow`).
"""
from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import launcher
from conftest import REPO, train_py
from launcher.watchdog import FLOOR_S, View, Watchdog, find_hang, grace, process_state, verdict_line

import faults  # bench/faults.py
import hangs  # bench/hangs.py

from training import ConfigError, TrainConfig

MLP = ["--model", "mlp", "--data", "digits", "--num-samples", "400", "--batch-size", "16", "--no-progress",
       "--no-tensorboard"]


def view(rank: int, phase: str, age: float, *, limit: float = 60, silent: float = 0.0, step: int = 7) -> View:
    return View(rank=rank, host="h", pid=100 + rank, step=step, phase=phase, age=age, limit=limit, silent=silent,
                silent_limit=60)


def solo_info() -> launcher.DistInfo:
    return launcher.DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                             device=torch.device("cpu"), backend=None, launcher="none", strategy="single")


# ------------------------------------------------------------------------------------------- units

def test_the_stuck_rank_is_named_not_the_ranks_that_wait_for_it():
    # rank 1 stopped (no heartbeat) while rank 0 waits in DDP's gradient all-reduce: rank 0 went over first
    f = find_hang({0: view(0, "backward", 70), 1: view(1, "forward", 2, silent=61)})
    assert f.stuck == (1,) and f.waiting == (0,) and not f.mismatch
    # a live rank stuck in its data loading (its own watchdog still publishes)
    f = find_hang({0: view(0, "collective", 61), 1: view(1, "data", 61)})
    assert f.stuck == (1,) and f.waiting == (0,)
    # the waiting rank is blocked in a collective inside a save: still waiting, not stuck
    f = find_hang({0: view(0, "save", 70), 1: view(1, "forward", 3, silent=61)})
    assert f.stuck == (1,) and f.waiting == (0,)
    # only ranks over in a save (one writing to a hung filesystem, the other in the save's barrier): after the
    # grace both are named, the stacks tell which; under fsdp a rank waiting in forward's gather is not "stuck"
    assert find_hang({0: view(0, "save", 61), 1: view(1, "save", 61)}) is None
    assert find_hang({0: view(0, "save", 76), 1: view(1, "save", 76)}).stuck == (0, 1)
    fsdp_own = {"data", "optimizer"}
    f = find_hang({0: view(0, "forward", 70), 1: view(1, "data", 65)}, own=fsdp_own)
    assert f.stuck == (1,) and f.waiting == (0,)
    # nothing over its limit, or only waiting ranks not yet past the grace: no verdict
    assert find_hang({0: view(0, "forward", 59), 1: view(1, "backward", 59)}) is None
    assert find_hang({0: view(0, "backward", 61), 1: view(1, "collective", 30)}) is None
    # a rank silent for a moment (a slow store) is not hung
    assert find_hang({0: view(0, "backward", 3), 1: view(1, "forward", 3, silent=4)}) is None
    # every rank waits past limit + grace: a collective that never matches, all named
    f = find_hang({0: view(0, "collective", 60 + grace(60) + 1, step=12), 1: view(1, "backward", 80, step=13)})
    assert f.mismatch and f.stuck == (0, 1)
    # a finished rank is never judged
    assert find_hang({0: view(0, "done", 1e9, limit=math.inf)}) is None


def test_the_verdict_line_names_rank_pid_host_step_phase_and_duration():
    views = {0: view(0, "backward", 75), 1: View(rank=1, host="node2", pid=4242, step=13, phase="forward", age=64,
                                               limit=60, silent=62, state="T", silent_limit=60)}
    line = verdict_line(find_hang(views), views, "runs/x/hangs/20261204-120000")
    assert line.startswith("hung: rank 1 (pid 4242 on node2): no heartbeat for 62 s, process stopped (state T")
    assert "last seen in forward of step 13" in line and "waiting for it: rank 0 in backward" in line
    assert "runs/x/hangs/20261204-120000" in line and "exits 124" in line and "\n" not in line
    assert process_state(os.getpid()) in ("R", "S")


def test_phase_limits_are_sized_from_what_each_phase_took(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("launcher.watchdog.time.monotonic", lambda: clock[0])
    wd = Watchdog(solo_info(), report_dir=Path("unused"), timeout_s=None, startup_s=300)
    assert wd.limit("data") == 300 and wd.limit("setup") == 300  # not measured yet: the collective timeout
    for phase, took in (("data", 0.01), ("forward", 0.02), ("backward", 0.5), ("optimizer", 0.03),
                        ("collective", 0.001), ("save", 9.0)):
        wd.phase(phase, 1)
        clock[0] += took
    wd.phase("collective", 1)
    assert wd.limit("data") == FLOOR_S and wd.limit("save") == 90.0 and wd.limit("done") == math.inf
    wd.step_done()
    own, wall = wd.take_step_times()  # own: data + forward + optimizer; wall: the step without its save
    assert own == [pytest.approx(0.06)] and wall == [pytest.approx(0.561)]
    fixed = Watchdog(solo_info(), report_dir=Path("unused"), timeout_s=20, startup_s=300)
    assert fixed.limit("save") == 20 and fixed.limit("setup") == 300


def test_a_rank_three_times_slower_is_named_once_after_n_steps():
    s = launcher.Stragglers(steps=3)
    row, warnings = s.update(1, [[0.01, 0.01], [0.03, 0.03]])  # two steps: not yet
    assert warnings == [] and row["slowest_rank"] == 1 and row["step_time_min"] == pytest.approx(0.01)
    assert row["step_time_max"] == pytest.approx(0.03) and row["step_time_median"] == pytest.approx(0.02)
    _, warnings = s.update(3, [[0.01, 0.01], [0.03, 0.03]])
    assert len(warnings) == 1 and warnings[0].startswith("rank 1 is a straggler") and "steps 1-3" in warnings[0]
    _, warnings = s.update(5, [[0.01, 0.01, 0.01], [0.011, 0.03, 0.03]])  # recovered, then slow again: 2 steps
    assert warnings == []
    assert launcher.Stragglers(steps=3).update(1, [[0.01] * 5, [0.019] * 5])[1] == []  # 1.9x is not a straggler


def test_the_generated_slurm_script_requeues_a_job_whose_rank_hung_a_bounded_number_of_times():
    from launcher import launch

    p = subprocess.run([sys.executable, "-m", "launcher", "--nnodes", "2", "--nproc-per-node", "2", "--slurm",
                        "scripts/train.py", "--strategy", "ddp"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    i = lines.index(f'if [ "$rc" = 124 ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {launch.HANG_REQUEUES} ]; then')
    assert lines[i + 2] == '    scontrol requeue "$SLURM_JOB_ID" && exit 0' and lines[-1] == 'exit "$rc"'
    assert subprocess.run(["bash", "-n"], input=p.stdout, text=True).returncode == 0


def test_bad_watchdog_flags_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"--hang-timeout must be >= 0 seconds \(0 turns the watchdog off\)"):
        TrainConfig(hang_timeout=-1)
    with pytest.raises(ConfigError, match="--straggler-steps must be >= 0"):
        TrainConfig(straggler_steps=-2)
    p = train_py(MLP + ["--preempt-grace", "0"])
    assert p.returncode == 2 and p.stderr.strip() == "error: --preempt-grace must be > 0 seconds, got 0.0"


class _Pid(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10 ** 6

    def __getitem__(self, i: int):
        return os.getpid()


@pytest.mark.multiproc
@pytest.mark.timeout(60)
@pytest.mark.parametrize("spared", [True, False], ids=["leave_signals_to_main", "torch-default"])
def test_dataloader_workers_take_sigterm_only_from_their_parent(spared):
    """A SIGTERM from another process (a scheduler, torchrun's killpg) and the preemption signal leave the worker
    running; its parent's SIGTERM (multiprocessing's terminate) still ends it. Without the init fn the first
    SIGTERM kills it (the failure this guards against)."""
    sigs = launcher.preemption_signals(["SIGUSR1"])
    init = functools.partial(launcher.leave_signals_to_main, sigs) if spared else None
    it = iter(DataLoader(_Pid(), batch_size=1, num_workers=1, worker_init_fn=init))
    pid = int(next(it))
    if not spared:
        with pytest.raises(RuntimeError, match="killed by signal: Terminated"):  # torch's SIGCHLD handler, or next()
            subprocess.run(["kill", "-TERM", str(pid)], check=True)
            time.sleep(0.5)
            for _ in range(100):
                next(it)
        return
    subprocess.run(["kill", "-TERM", str(pid)], check=True)  # sent by another process
    subprocess.run(["kill", "-USR1", str(pid)], check=True)
    time.sleep(0.5)
    assert process_state(pid) not in (None, "Z") and int(next(it)) == pid  # alive, still serving batches
    os.kill(pid, signal.SIGTERM)  # from its parent: it ends, with status 0 (torch reports no failure)
    assert faults.wait_for(lambda: process_state(pid) in (None, "Z"), 10)
    del it


def test_a_save_that_does_not_fit_the_grace_is_said_at_start_up_and_saves_come_more_often(tmp_path):
    """The resumed entry recorded how long its predecessor's save took: with --preempt-grace smaller than a step
    plus a save, the restarted run warns at once and saves every N steps it names."""
    # 1280 training samples, 64 per step in 4 micro-batches: 20 steps per epoch, steps slow enough beside a
    # (synchronous, so not slowed by training beside it) save of a small model
    run = ["--model", "mlp", "--model-arg", "hidden=32", "--data", "digits", "--num-samples", "1600", "--batch-size",
           "64", "--grad-accum", "4", "--no-async-save", "--no-progress", "--no-tensorboard", "--output-dir",
           str(tmp_path), "--keep-last", "0", "--log-every", "5", "--epochs", "100"]
    assert train_py(run + ["--max-steps", "20", "--save-every", "10"]).returncode == 0
    state = json.loads((tmp_path / "checkpoints/step-20/state.json").read_text())["states"]["trainer"]
    assert state["save_seconds"] > 0 and state["step_seconds"] > 0
    # the restarted run decides from the entry's own figures, so the interval is known before it starts; the
    # run is sized to hold two of them (a slow disk makes saves, and so the interval, longer: 133 steps for 0.04 s
    # saves and 1.2 ms steps, 885 for 0.25 s saves)
    expected = max(1, math.ceil(4 * state["save_seconds"] / state["step_seconds"]))
    last = 20 * math.ceil((21 + 2 * expected) / 20) + 10  # not on an epoch's end
    p = train_py(run + ["--max-steps", str(last), "--resume", "auto", "--preempt-grace", "0.0001"])
    assert p.returncode == 0, p.stderr[-2000:]
    said = re.findall(r"more than the 0.0001 s the scheduler leaves before SIGKILL \(--preempt-grace\).*saving every "
                      r"(\d+) steps instead of (every \d+|only at the end)", p.stderr)
    assert said and said[0][1] == "only at the end", p.stderr[-2000:]
    assert p.stderr.index("saving every") < p.stderr.index("epoch 1 step 40")  # at start-up, before training
    assert len(said) == 1, said  # decided once
    every = int(said[0][0])
    assert every == expected, (every, expected)
    steps = sorted(int(d.name[5:]) for d in (tmp_path / "checkpoints").glob("step-*"))
    # past step 20 every entry is on the announced interval, an epoch's end (a new best entry) or the last step
    assert all(s <= 20 or s % 20 == 0 or s == last or s % every == 0 for s in steps), (every, steps)
    assert {every * k for k in range(1, last // every + 1) if 20 < every * k < last} <= set(steps), \
        (every, steps)


# ------------------------------------------------------------------------------------------- runs

def _log(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()


@pytest.mark.multiproc
@pytest.mark.timeout(150)
def test_a_sigstopped_rank_is_named_within_the_timeout_and_the_job_ends_non_zero(tmp_path):
    """Rank 1 of 2 SIGSTOPped mid-training: within --hang-timeout + 10 s every live rank says which rank, where,
    and that it is stopped; rank 0's stacks are on disk, rank 1's file says it could not answer; torchrun ends
    non-zero (rank 0 exits 124, the stopped rank is SIGKILLed) instead of waiting out the collective timeout."""
    r = hangs.trial_sigstop(tmp_path, "stop", 8)
    out = Path(r["out"])
    assert r["ok"], (r, _log(out)[-3000:])
    line = r["report"]
    assert line.startswith(f"hung: rank 1 (pid {r['victim_pid']} on ") and "process stopped (state T" in line, line
    assert "waiting for it: rank 0" in line
    text = _log(out)
    assert f"error: rank 0/2: {line}" in text  # the same line on the live rank's stderr
    where = Path(r["dir"])
    stacks = (where / "rank-0.txt").read_text()
    assert "Thread 0x" in stacks and "training/trainer.py" in stacks and "in fit" in stacks, stacks[:2000]
    assert "stopped (state T: SIGSTOP): a stopped process cannot dump its stacks; SIGKILLed" in (
        where / "rank-1.txt").read_text()
    assert re.search(r"rank 0 \(pid \d+\) exit code 124, rank 1 \(pid \d+\) killed by SIGKILL", text), text[-2000:]
    assert r["rc"] == launcher.HUNG_EXIT_CODE  # the agent too, so that a job script can requeue on it
    assert "Traceback" not in text
    assert r["exit_s"] < 8 + 20  # not the 30 s torchrun gives a stopped worker, nor the 300 s collective timeout


@pytest.mark.multiproc
@pytest.mark.slow  # ~30 s: `make test-slow`
@pytest.mark.timeout(400)
def test_a_hang_under_torchrun_restarts_and_resumes_to_the_uninterrupted_weights(tmp_path):
    """The same SIGSTOP with --max-restarts=1: the restarted group resumes the newest checkpoint by itself and
    ends with the uninterrupted run's final weights, bit for bit (same world size)."""
    ref = faults.reference(tmp_path, 180)
    # every rank's data take 10 ms per batch, so that the stop lands mid-run (the data are unchanged)
    r = hangs.trial_sigstop(tmp_path, "restart", 8, restarts=1, model_args=faults.MODEL_ARGS, fault="slow-data:0:20",
                            at_step=15, timeout=240)
    out = Path(r["out"])
    assert r["ok"], (r, _log(out)[-3000:])
    text = _log(out)
    assert re.search(r"restart 1: resuming from step-(1|2)0", text), text[-3000:]
    assert "stale lock" not in text  # the hung rank 0 released the run's lock on its way out
    assert faults.max_rel_diff(faults.final_weights(out), ref["weights"]) == 0.0


@pytest.mark.multiproc
@pytest.mark.slow  # ~16 s
@pytest.mark.timeout(200)
def test_a_rank_sleeping_in_its_data_loader_worker_is_named_with_the_workers_stack(tmp_path):
    out = tmp_path / "o"
    proc = hangs.launch(out, fault="sleep-data:1:200:1000", extra=["--hang-timeout", "8", "--workers", "1"])
    rc = faults.finish(proc, 150)
    text = _log(out)
    found = hangs.reports(out)
    assert rc == launcher.HUNG_EXIT_CODE and found, text[-3000:]
    line = found[0].read_text().splitlines()[0]
    assert re.match(r"hung: rank 1 \(pid \d+ on \S+\) in data of step \d+ for \d+ s; waiting for it: rank 0 in "
                    r"(backward|collective)", line), line
    assert text.count(f": {line}") == 2  # both ranks said it (rank 1's own watchdog still runs)
    rank1 = (found[0].parent / "rank-1.txt").read_text()
    assert "a DataLoader worker" in rank1 and "_hang_worker.py" in rank1 and "in __getitem__" in rank1, rank1[-3000:]
    assert re.search(r"rank 0 \(pid \d+\) exit code 124, rank 1 \(pid \d+\) exit code 124", text), text[-1500:]


@pytest.mark.multiproc
@pytest.mark.slow  # ~5 s, but a fault run like the others here
@pytest.mark.timeout(200)
def test_a_rank_that_skips_one_all_reduce_stops_the_job_in_seconds(tmp_path):
    """Rank 1 leaves out one step-boundary all-reduce, so its next collective (the gradients') meets rank 0's
    small one. gloo checks sizes and aborts the rank receiving the larger message at once (with NCCL the ranks
    would hang, which the watchdog's "collectives that never complete" verdict covers): the job ends within
    seconds, not the 300 s collective timeout; the survivor says in one line that its peer went away during a
    collective, the agent names the aborted rank; no Python traceback."""
    out = tmp_path / "o"
    t0 = time.monotonic()
    proc = hangs.launch(out, fault="skip-allreduce:1:15", extra=["--hang-timeout", "8"])
    rc = faults.finish(proc, 150)
    took = time.monotonic() - t0
    text = _log(out)
    assert rc == 1 and took < 60, (took, text[-3000:])
    assert "Is there a distributed collective mismatch in your code?" in text  # gloo's own words
    assert re.search(r"error: rank 1/2 on \S+: the peer at \S+ went away during a collective", text), text[-3000:]
    assert "rank 0 (pid" in text and "killed by SIGABRT" in text and "Traceback" not in text, text[-3000:]


@pytest.mark.multiproc
@pytest.mark.slow  # ~7 s each
@pytest.mark.timeout(300)
@pytest.mark.parametrize("slow_ms", [60, 20], ids=["3x-slower", "all-equal"])
def test_a_straggler_three_times_slower_is_named_and_its_spread_logged(tmp_path, slow_ms):
    out = tmp_path / "o"
    args = MLP + ["--max-steps", "40", "--log-every", "5", "--strategy", "ddp", "--epochs", "10"]
    proc = hangs.launch(out, fault=f"slow-data:1:{slow_ms}", model_args=args)
    rc = faults.finish(proc, 240)
    text = _log(out)
    assert rc == 0, text[-3000:]
    rows = [r for r in csv.DictReader(open(out / "metrics.csv")) if r["step_time_max"]]
    assert len(rows) == 8
    warned = [ln for ln in text.splitlines() if "is a straggler" in ln]
    if slow_ms == 60:
        assert len(warned) == 1 and "rank 1 is a straggler" in warned[0] and "[rank 0/2]" in warned[0], text[-2000:]
        assert all(r["slowest_rank"] == "1" and float(r["step_time_max"]) > 2 * float(r["step_time_min"])
                   for r in rows[1:]), rows
    else:
        assert warned == [], warned


@pytest.mark.multiproc
@pytest.mark.slow  # ~18 s
@pytest.mark.timeout(400)
def test_sigterm_with_two_dataloader_workers_checkpoints_and_resumes_exactly(tmp_path):
    """torchrun's agent SIGTERMed: it killpg()s each rank's process group, DataLoader workers included. The
    workers leave the signal to their rank, which checkpoints and exits 143 well within torchrun's 30 s;
    --resume auto then repeats every per-step loss of an uninterrupted run (without workers) exactly."""
    import random

    ref = faults.reference(tmp_path, 180)
    r = faults.trial_sigterm(tmp_path, 0, "agent", ref, random.Random(0), 180, extra=["--workers", "2"])
    assert r["ok"] is True, (r, faults.log_text(tmp_path / "sigterm-agent-0")[-3000:])
    assert r["signal_to_exit_s"] < 30 and r["losses_equal"]


@pytest.mark.multiproc
@pytest.mark.slow  # ~25 s
@pytest.mark.timeout(200)
def test_without_an_agent_a_stopped_rank_0_that_hosts_the_store_is_still_named(tmp_path):
    """Two processes started by hand, as srun starts them (RANK/WORLD_SIZE/MASTER_* set, no torchrun): rank 0's
    process hosts the rendezvous store. Rank 0 SIGSTOPped: rank 1 can read no heartbeat any more; once the store
    has not answered for its limit it reports alone, names rank 0 as stopped (same host: /proc), ends it, and
    exits 124."""
    port = faults.free_port()
    out = tmp_path / "o"
    procs = []
    for rank in (0, 1):
        env = {**faults._env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), *hangs.LONG_ARGS,
                                       "--output-dir", str(out), "--hang-timeout", "8"], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    try:
        assert faults.wait_for(lambda: (out / "checkpoints" / "latest").is_file(), 120), \
            (tmp_path / "rank1.log").read_text()[-2000:]
        time.sleep(1.5)
        os.kill(procs[0].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        rc1 = procs[1].wait(90)
        took = time.monotonic() - stopped
        rc0 = procs[0].wait(10)  # ended by rank 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = (tmp_path / "rank1.log").read_text()
    assert rc1 == launcher.HUNG_EXIT_CODE and rc0 == -signal.SIGKILL, (rc0, rc1, text[-3000:])
    line = [ln for ln in text.splitlines() if ln.startswith("error: rank 1/2: ")]
    assert len(line) == 1 and f"the rendezvous store at 127.0.0.1:{port} has not answered" in line[0], text[-3000:]
    assert f"rank 0 (pid {procs[0].pid} on " in line[0] and "process stopped (state T" in line[0], line[0]
    assert took < 8 + 20, took  # the limit, plus the store client's timeouts on the way
    (where,) = (out / "hangs").iterdir()
    assert "SIGKILLed" in (where / "rank-0.txt").read_text() and "Thread 0x" in (where / "rank-1.txt").read_text()
