"""A watchdog thread on every rank: a hung or stopped rank is found in seconds, named, its stacks written, and
the job ends non-zero so that the launcher restarts it (and the run resumes its newest checkpoint).

A rank that dies is noticed by its peers at their next collective. A rank that stops making progress is not:
the others wait inside a collective until the process-group timeout (300 s by default), and gloo's message
then names an operation, not the rank, its host or what it was doing. Here each rank's main thread marks
where it is (:meth:`Watchdog.phase`: ``data``, ``forward``, ``backward``, ``optimizer``, ``collective``,
``save``, ``eval``; a few attribute stores, no I/O), and a thread publishes that once a second as a
heartbeat in the run's rendezvous store (:func:`launcher.dist.open_store`; no collective, so it runs while
the main thread is blocked in one). The same thread reads every rank's heartbeat and decides
(:func:`find_hang`, pure):

- a rank is *over* when its current phase has lasted longer than its limit: ``--hang-timeout``, or by
  default ``max(60 s, 10 x the longest that phase took so far on that rank)`` (a phase not yet measured:
  the collective timeout, so never later than gloo would fail);
- a rank is *silent* when its heartbeat has not changed for :data:`SILENT_S` seconds: the process is stopped
  (SIGSTOP), frozen, or its host is gone; it is over once silent for ``--hang-timeout`` (default
  :data:`FLOOR_S`), whatever phase it last published;
- the *stuck* ranks are the silent over ones, else the ones over in a phase that waits for no peer (data,
  forward, optimizer); the others may be waiting for them (collectives run in backward, at step boundaries,
  and inside save, eval and setup). Ranks over only in save/eval/setup are named once they are a grace past
  their limit; when every rank waits in a collective past that, they wait for each other in collectives that
  never match (one skipped or added a collective) and all are named (see :func:`find_hang`).

The first rank that finds a hang claims it (an atomic counter in the store) and posts one verdict; every rank
reads it within a second. Then every rank that can still run Python prints the verdict's one line, writes its
own Python stacks (``faulthandler``, every thread, and those of its DataLoader workers through the dump
signal) to ``REPORT_DIR/<time>/rank-R.txt``, and exits :data:`HUNG_EXIT_CODE` from this thread (its main
thread may be blocked in a collective for good). A rank that cannot answer is handled by the lowest live rank
on its host: a stopped one (``/proc/PID/stat`` state ``T``) is reported as stopped; a running but silent
one is sent :data:`DUMP_SIGNAL`, whose ``faulthandler`` handler runs in C without the interpreter, and its
stacks are copied from its dump file; then it is SIGKILLed, since it cannot exit by itself and the launcher
only restarts a group whose processes all ended. A rank traced by a debugger (state ``t``) is left alone.

Without a store (one process) the watchdog checks its own main thread the same way.
"""
from __future__ import annotations

import faulthandler
import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .dist import DistInfo, open_store

HUNG_EXIT_CODE = 124
"""Exit status of a rank that ended because a hang was found (``timeout(1)``'s): non-zero, so torchrun with
restarts left restarts the group, and a Slurm job script can requeue."""

PHASES = ("setup", "data", "forward", "backward", "optimizer", "collective", "save", "eval", "done")
WAITING = frozenset({"backward", "collective"})
"""Phases in which a healthy rank may be blocked by a peer (DDP all-reduces gradients during backward)."""
LOCAL = frozenset({"data", "forward", "optimizer"})
"""Phases whose time is this rank's own work (its step time: :meth:`Watchdog.take_step_times`)."""
BETWEEN_STEPS = frozenset({"setup", "save", "eval", "done"})
"""Phases that are not part of a training step's wall time."""

FLOOR_S = 60.0
"""The default limit of a measured phase is at least this."""
FACTOR = 10.0
"""... and at least this many times the longest that phase has taken on the rank."""
SILENT_S = 5.0
"""A heartbeat unchanged this long (publishing is every second) means the rank cannot run Python."""
DUMP_SIGNAL = signal.SIGRTMIN + 5
"""The signal whose ``faulthandler`` handler dumps a rank's stacks into its dump file (a real-time signal, so
it collides with no scheduler's preemption signal)."""


def grace(limit: float) -> float:
    """How long past their limit ranks that all wait in collectives are given before they are named: one of them
    may be waiting for a rank that is about to be found (a silent rank goes over later than its waiting peers)."""
    return max(5.0, 0.25 * limit)


@dataclass(frozen=True)
class View:
    """One rank as an observer sees it now."""

    rank: int
    host: str
    pid: int
    step: int
    phase: str
    age: float
    """Seconds in ``phase`` (the published age plus the time since it was published)."""
    limit: float
    """How long the rank allows ``phase`` (inf: never judged, e.g. once it is done)."""
    silent: float = 0.0
    """Seconds since its heartbeat last changed (0 for the observer itself)."""
    state: str | None = None
    """The process state letter from ``/proc/PID/stat`` when the observer shares its host (``T``: stopped)."""
    fd: int | None = None
    """The rank's dump file descriptor (see :data:`DUMP_SIGNAL`)."""
    silent_limit: float = math.inf
    """How long the observer lets a heartbeat stay unchanged: a silent rank may be anywhere by now, so its own
    limit, set for the phase it last published, does not apply (``--hang-timeout``, else :data:`FLOOR_S`)."""

    @property
    def over(self) -> bool:
        return self.age > self.limit or self.silent > self.silent_limit

    @property
    def responding(self) -> bool:
        return self.silent <= SILENT_S

    def describe(self) -> str:
        if self.pid == 0:
            return f"rank {self.rank} (never published a heartbeat, {self.silent:.0f} s after this rank's first)"
        what = f"in {self.phase}" + (f" of step {self.step}" if self.phase not in ("setup", "done") else "")
        if self.responding:
            return f"rank {self.rank} (pid {self.pid} on {self.host}) {what} for {self.age:.0f} s"
        why = (f"process stopped (state {self.state}: SIGSTOP or a debugger)" if self.state in ("T", "t")
               else "stopped, frozen, or its host is gone")
        return (f"rank {self.rank} (pid {self.pid} on {self.host}): no heartbeat for {self.silent:.0f} s, {why}; "
                f"last seen {what}")


@dataclass(frozen=True)
class Finding:
    stuck: tuple[int, ...]
    waiting: tuple[int, ...]
    mismatch: bool = False
    """Every rank waits in a collective: they wait for each other (a skipped or added collective)."""


def find_hang(views: Mapping[int, View], own: Collection[str] = LOCAL) -> Finding | None:
    """The hang among ``views`` (every rank the observer sees), or None. Pure: see the module docstring.

    ``own``: the phases in which a rank waits for no peer (``Watchdog.local_phases``). In the others --
    ``backward``/``collective`` (waiting ones), ``save``/``eval``/``setup`` (own work and collectives) -- a rank
    over its limit may be waiting for the stuck one. So the stuck ranks are, in this order of evidence: the
    silent ones; else those over in an own phase; else, once every over rank is a grace past its limit, those in
    save/eval/setup; else, when every rank waits in a collective, all of them (a collective that never matches).
    Every other rank is listed as waiting."""
    over = [r for r, v in sorted(views.items()) if v.over]
    stuck = [r for r in over if not views[r].responding] or [r for r in over if views[r].phase in own]
    mismatch = False
    if not stuck and over and all(views[r].age > views[r].limit + grace(views[r].limit) for r in over):
        stuck = [r for r in over if views[r].phase not in WAITING]
        if not stuck and all(v.phase in WAITING or v.phase == "done" for v in views.values()):
            stuck, mismatch = over, True
    if not stuck:
        return None
    waiting = tuple(r for r, v in sorted(views.items()) if r not in stuck and v.phase != "done")
    return Finding(tuple(stuck), () if mismatch else waiting, mismatch)


def verdict_line(finding: Finding, views: Mapping[int, View], where: str | Path) -> str:
    """The one line every rank prints and ``report.txt`` holds."""
    if finding.mismatch:
        head = ("ranks wait for each other in collectives that never complete (a rank skipped or added a "
                "collective): " + "; ".join(views[r].describe() for r in finding.stuck))
    else:
        head = "hung: " + "; ".join(views[r].describe() for r in finding.stuck)
        if finding.waiting:
            head += f"; waiting for {'it' if len(finding.stuck) == 1 else 'them'}: " + ", ".join(
                f"rank {r} in {views[r].phase}" for r in finding.waiting)
    return (f"{head}; stacks in {where}; every rank exits {HUNG_EXIT_CODE} so that the launcher restarts the "
            "run (torchrun --max-restarts, a requeued Slurm job), which resumes from its newest checkpoint")


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` on this host (``R``, ``S``, ``D``, ``T`` stopped, ``t`` traced,
    ``Z``), or None when it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else None


def _bounded(fn: Callable[[], Any], timeout_s: float) -> None:
    """``fn()`` on a daemon thread, waited for at most ``timeout_s``; its errors are dropped (store calls on the
    way out: the store may be gone, or its server stopped, where a call never returns)."""
    def run() -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001
            pass

    t = threading.Thread(target=run, name="anytopo-watchdog-io", daemon=True)
    t.start()
    t.join(timeout_s)


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` (on this host) has a handler for ``sig`` (``SigCgt`` of ``/proc/PID/status``):
    only then is sending it harmless (the default action of a real-time signal ends the process)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (int(sig) - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


class Watchdog:
    """Heartbeats and hang detection for one rank; see the module docstring.

    Args:
        info: this process's place in the run.
        report_dir: where ``<time>/report.txt`` and ``<time>/rank-R.txt`` go (``OUTPUT_DIR/hangs``).
        timeout_s: a fixed limit for every phase; None: sized from the measured phase times (see
            :data:`FLOOR_S`, :data:`FACTOR`); a phase not yet measured and ``setup`` get ``startup_s``.
        startup_s: the limit before a phase is measured (the collective timeout: never later than gloo).
        local_phases: the phases counted as this rank's own step time.
        poll_s: how often the heartbeat is published and the others read.
        log: where the watchdog's own troubles go (a ``logging.Logger``, debug level).
        on_exit: called (best effort) just before a rank exits for a hang, e.g. to release the run's lock.

    Example:
        >>> with Watchdog(info, report_dir=out / "hangs", timeout_s=None, startup_s=300) as wd:
        ...     wd.phase("data", step)
    """

    def __init__(self, info: DistInfo, *, report_dir: Path, timeout_s: float | None, startup_s: float,
                 local_phases: Collection[str] = LOCAL, poll_s: float = 1.0, log: Any = None,
                 on_exit: Callable[[], Any] | None = None):
        self.info, self.report_dir, self.log, self.on_exit = info, Path(report_dir), log, on_exit
        self.timeout_s, self.startup_s = timeout_s, startup_s
        self.poll_s = max(poll_s, info.world_size / 64)  # every rank reads every heartbeat once per poll
        self.local_phases = frozenset(local_phases)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._now: tuple[int, str, float] = (0, "setup", time.monotonic())
        self._longest: dict[str, float] = {}
        self._step_local = 0.0
        self._step_wall = 0.0
        self._step_times: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard: threading.Thread | None = None
        self._acting = threading.Lock()
        self._reached = time.monotonic()  # the store last answered (world > 1)
        self._store = None
        self._seen: dict[int, tuple[int, float, dict]] = {}  # rank -> (beat, monotonic time first seen, heartbeat)
        self._beat = 0
        self._dump_file = None
        self._t0 = time.monotonic()
        self.thread_cpu_s = 0.0
        """CPU seconds the watchdog thread has used, over its runs so far (what it can take from training)."""

    # -- the main thread's side: cheap

    def phase(self, name: str, step: int) -> None:
        """The main thread enters ``name`` of step ``step``: a few attribute stores, no I/O."""
        now = time.monotonic()
        _, prev, since = self._now
        took = now - since
        if took > self._longest.get(prev, 0.0):
            self._longest[prev] = took
        if prev in self.local_phases:
            self._step_local += took
        if prev not in BETWEEN_STEPS:
            self._step_wall += took
        self._now = (step, name, now)

    def step_done(self) -> None:
        """A training step ended: its times join :meth:`take_step_times`."""
        self._step_times.append((self._step_local, self._step_wall))
        self._step_local = self._step_wall = 0.0

    def take_step_times(self) -> tuple[list[float], list[float]]:
        """Since the last call, per step: this rank's own time (the local phases), and the step's wall time
        without the saves and evaluations between steps, in seconds."""
        out, self._step_times = self._step_times, []
        return [t[0] for t in out], [t[1] for t in out]

    def limit(self, phase: str) -> float:
        """How long ``phase`` may last on this rank before it counts as hung."""
        if phase == "done":
            return math.inf
        if phase == "setup":
            return max(self.timeout_s or 0.0, self.startup_s)
        if self.timeout_s is not None:
            return self.timeout_s
        took = self._longest.get(phase)
        return self.startup_s if took is None else max(FLOOR_S, FACTOR * took)

    # -- lifetime

    def start(self) -> "Watchdog":
        self._stop.clear()
        self._dump_file = tempfile.TemporaryFile()  # unlinked: a peer on this host reads it via /proc/PID/fd
        faulthandler.register(DUMP_SIGNAL, file=self._dump_file, all_threads=True, chain=False)
        self._t0 = time.monotonic()
        if self.info.world_size > 1:
            self._store = self._connect()
            try:
                self._publish(self._t0)  # at once: a rank stopped before the thread's first beat is still seen
            except Exception:  # noqa: BLE001 -- the thread retries
                self._store = None
        self._reached = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="anytopo-watchdog", daemon=True)
        self._thread.start()
        if self.info.world_size > 1:
            self._guard = threading.Thread(target=self._watch_store, name="anytopo-watchdog-guard", daemon=True)
            self._guard.start()
        return self

    def stop(self) -> None:
        """Publish a last heartbeat that says this rank is done (never judged), end the thread and wait for it
        (a thread left inside the store's C++ while the interpreter finalizes aborts the process)."""
        if self._thread is None:
            return
        self._stop.set()
        for thread in (self._thread, self._guard):
            if thread is not None:
                thread.join(timeout=10)  # a store call to a stopped server never returns: do not wait for it
        self._thread = self._guard = None
        self.phase("done", self._now[0])
        _bounded(lambda: self._publish(time.monotonic()), 2.0)  # the store may be gone: nothing to tell then
        faulthandler.unregister(DUMP_SIGNAL)
        self._dump_file.close()

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the thread

    def _connect(self):
        try:
            return open_store("watchdog")
        except Exception:  # noqa: BLE001 -- unreachable now: the next poll tries again
            return None

    def _heartbeat(self, now: float) -> dict:
        step, phase, since = self._now
        return {"rank": self.info.rank, "host": self.host, "pid": self.pid, "step": step, "phase": phase,
                "age": now - since, "limit": None if phase == "done" else self.limit(phase), "beat": self._beat,
                "fd": self._dump_file.fileno() if self._dump_file is not None and not self._dump_file.closed else None}

    def _publish(self, now: float) -> None:
        self._beat += 1
        if self._store is not None:
            self._store.set(f"hb/{self.info.rank}", json.dumps(self._heartbeat(now)))

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            try:
                if self._store is None and self.info.world_size > 1:
                    self._store = self._connect()
                    if self._store is None:
                        raise ConnectionError("the rendezvous store does not answer")
                self._tick(now)
                self._reached = now
            except Exception as e:  # noqa: BLE001 -- the store timed out or went away: reconnect next time
                self._store = None
                if self.log is not None:
                    self.log.debug("watchdog: %s", e)
        self.thread_cpu_s += time.thread_time()  # this thread's CPU time since it started

    def _watch_store(self) -> None:
        """A request to a store whose server process is stopped never returns (the client's timeout does not
        bound it), so another thread notices when the heartbeat thread has not reached the store for longer
        than this rank's limit, and reports alone."""
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            if now - self._reached > self.limit(self._now[1]):
                self._store = None
                self._act(self._offline_verdict(now, now - self._reached))

    def _tick(self, now: float) -> None:
        self._publish(now)
        verdict = self._posted_verdict()
        if verdict is None:
            views = self._views(now)
            finding = find_hang(views, self.local_phases)
            if finding is None:
                return
            verdict = self._declare(finding, views)
        self._act(verdict)

    def _offline_verdict(self, now: float, lost: float) -> dict:
        """The store has not answered for longer than this rank's limit: it cannot learn or post a verdict, so
        it reports alone (the store lives in torchrun's agent, or in rank 0's process when no agent runs), from
        the heartbeats it last read; a rank on this host that is stopped is named, and ended as in a verdict."""
        addr = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        own = self._view(self._heartbeat(now), 0.0)
        views = {own.rank: own, **{r: self._view(hb, now - first) for r, (_, first, hb) in self._seen.items()}}
        stopped = [v for r, v in sorted(views.items()) if v.state in ("T", "t")]
        where = self._new_report_dir()
        line = (f"the rendezvous store at {addr} has not answered for {lost:.0f} s (it lives in torchrun's agent, or "
                "in rank 0's process when no agent runs): " + ("; ".join(v.describe() for v in stopped) if stopped
                                                                else "that process or its host is stuck or gone")
                + f"; this rank {own.describe()[len(f'rank {own.rank} '):]}; stacks in {where}; it exits "
                f"{HUNG_EXIT_CODE} so that the launcher restarts the run, which resumes from its newest checkpoint")
        return {"line": line, "dir": str(where), "stuck": [v.rank for v in stopped],
                "views": {str(r): asdict(v) for r, v in views.items()}}

    def _posted_verdict(self) -> dict | None:
        if self._store is None or not self._store.check(["verdict"]):
            return None
        return json.loads(self._store.get("verdict"))

    def _views(self, now: float) -> dict[int, View]:
        views = {self.info.rank: self._view(self._heartbeat(now), 0.0)}
        if self._store is None:
            return views
        others = [r for r in range(self.info.world_size) if r != self.info.rank]
        present = [r for r in others if r in self._seen or self._store.check([f"hb/{r}"])]
        values = self._store.multi_get([f"hb/{r}" for r in present]) if present else []
        for r, raw in zip(present, values):
            hb = json.loads(raw)
            beat, first, _ = self._seen.get(r, (None, now, None))
            self._seen[r] = (hb["beat"], now if beat != hb["beat"] else first, hb)
        for r in others:
            if r in self._seen:
                _, first, hb = self._seen[r]
                views[r] = self._view(hb, now - first)
            else:  # its watchdog never started: judged as in setup since this one's start
                views[r] = View(rank=r, host="?", pid=0, step=0, phase="setup", age=now - self._t0,
                                limit=self.startup_s, silent=now - self._t0)
        return views

    def _view(self, hb: dict, silent: float) -> View:
        limit = math.inf if hb["limit"] is None else float(hb["limit"])
        v = View(rank=hb["rank"], host=hb["host"], pid=hb["pid"], step=hb["step"], phase=hb["phase"],
                 age=hb["age"] + silent, limit=limit, silent=silent, fd=hb.get("fd"),
                 silent_limit=math.inf if limit == math.inf else self.timeout_s or FLOOR_S)
        if not v.responding and v.host == self.host:
            v = replace(v, state=process_state(v.pid))
        return v

    def _declare(self, finding: Finding, views: dict[int, View]) -> dict:
        """Post the verdict, or read the one another rank posted first."""
        if self._store is not None and self._store.add("claim", 1) != 1:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                verdict = self._posted_verdict()
                if verdict is not None:
                    return verdict
                time.sleep(0.05)
        where = self._new_report_dir()
        line = verdict_line(finding, views, where)
        verdict = {"line": line, "dir": str(where), "stuck": list(finding.stuck),
                   "views": {str(r): asdict(v) for r, v in views.items()}}
        try:
            (where / "report.txt").write_text(line + "\n\n" + "\n".join(
                f"rank {r}: {json.dumps(asdict(v))}" for r, v in sorted(views.items())) + "\n")
        except OSError:
            pass
        if self._store is not None:
            self._store.set("verdict", json.dumps(verdict))
        return verdict

    def _new_report_dir(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(100):
            where = self.report_dir / (stamp if n == 0 else f"{stamp}-{n}")
            try:
                where.mkdir(parents=True)
                return where
            except FileExistsError:
                continue
            except OSError:
                break
        return self.report_dir / stamp

    def _act(self, verdict: dict) -> None:
        """Say it, write the stacks this rank can give, end the ranks on this host that cannot end themselves,
        and exit :data:`HUNG_EXIT_CODE` once every live rank has written its stacks (at most a few seconds)."""
        if not self._acting.acquire(blocking=False):  # the other watchdog thread is acting: it exits the process
            threading.Event().wait()
        rank = self.info.rank
        prefix = f"rank {rank}/{self.info.world_size}: " if self.info.world_size > 1 else ""
        sys.stderr.write(f"error: {prefix}{verdict['line']}\n")
        sys.stderr.flush()
        where = Path(verdict["dir"])
        views = {int(r): View(**v) for r, v in verdict["views"].items()}
        self._write_own_stacks(where, views.get(rank))
        live_here = sorted(r for r, v in views.items() if v.responding and v.host == self.host)
        if live_here and live_here[0] == rank:
            for r in verdict["stuck"]:
                v = views[r]
                if not v.responding and v.host == self.host and r != rank:
                    self._end_silent(where, v)
        store = self._store
        if store is not None:
            def wait_for_the_others() -> None:
                store.set(f"done/{rank}", "1")
                live = [f"done/{r}" for r, v in views.items() if v.responding]
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and not store.check(live):
                    time.sleep(0.05)

            _bounded(wait_for_the_others, 6.0)
        for child in multiprocessing.active_children():  # DataLoader workers: their parent is leaving now
            child.kill()
        if self.on_exit is not None:
            try:
                self.on_exit()
            except Exception:  # noqa: BLE001 -- leaving all the same
                pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(HUNG_EXIT_CODE)

    def _write_own_stacks(self, where: Path, view: View | None) -> None:
        try:
            where.mkdir(parents=True, exist_ok=True)
            with open(where / f"rank-{self.info.rank}.txt", "a") as f:  # appends: faulthandler writes to its fd
                f.write((view.describe() if view else f"rank {self.info.rank} (pid {self.pid} on {self.host})")
                        + "; stacks of every thread (faulthandler):\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
                for child in multiprocessing.active_children():
                    if catches(child.pid, DUMP_SIGNAL):  # forked with the handler (not a spawned child)
                        f.write(f"\nchild process {child.pid} (a DataLoader worker):\n")
                        f.write(self._dump_via_signal(child.pid, self.pid, self._dump_file.fileno())
                                or "(no answer to the dump signal)\n")
                        f.flush()
        except OSError:
            pass

    def _end_silent(self, where: Path, view: View) -> None:
        """A rank on this host that cannot run Python: its stacks if it can give them, then SIGKILL (not when a
        debugger traces it)."""
        state = process_state(view.pid)
        if state is None:
            note = "gone (no such process on this host any more)"
        elif state == "t":
            note = "traced by a debugger (state t): no stacks, left alone"
        elif state == "T":
            note = "stopped (state T: SIGSTOP): a stopped process cannot dump its stacks; SIGKILLed"
        else:
            stacks = self._dump_via_signal(view.pid, view.pid, view.fd) if catches(view.pid, DUMP_SIGNAL) else None
            note = (f"state {state}, not publishing heartbeats; its stacks (faulthandler, {DUMP_SIGNAL.name}):\n"
                    f"{stacks}" if stacks else f"state {state}: no answer to the dump signal; SIGKILLed")
        try:
            (where / f"rank-{view.rank}.txt").write_text(f"{view.describe()}\n\n{note}\n")
        except OSError:
            pass
        if state not in (None, "t", "Z"):
            try:
                os.kill(view.pid, signal.SIGKILL)
            except OSError:
                pass

    @staticmethod
    def _dump_via_signal(pid: int, owner: int, fd: int | None, wait_s: float = 2.0) -> str | None:
        """Send :data:`DUMP_SIGNAL` to ``pid`` and return what its handler appended to the dump file ``fd`` of
        process ``owner`` (the same file for a rank and the DataLoader workers it forked)."""
        if fd is None:
            return None
        path = f"/proc/{owner}/fd/{fd}"
        try:
            before = os.stat(path).st_size
            os.kill(pid, DUMP_SIGNAL)
        except OSError:
            return None
        size, deadline = before, time.monotonic() + wait_s
        while time.monotonic() < deadline:  # the handler writes in many small writes: wait until it stops
            time.sleep(0.1)
            now = os.stat(path).st_size
            if now > before and now == size:
                break
            size = now
        if size <= before:
            return None
        with open(path, "rb") as f:
            f.seek(before)
            return f.read(size - before).decode(errors="replace")
