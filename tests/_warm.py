"""A warm interpreter for the tests' single-process training runs: ``scripts/train.py`` without paying for
``import torch`` (and torchvision, sklearn's loaders, the project) at every run.

The server (this file run as a script) imports what a training run imports, then serves one request at a time
on stdin: it forks, and the child -- a fresh process with the server's imports already done and nothing else
(the server never computes, so no thread pool exists to be lost in the fork) -- takes the request's working
directory, environment and argv, sends its stdout/stderr to files, and runs ``launcher.run_main(training.cli)``,
exactly what ``scripts/train.py`` runs. The server answers with the child's exit status (killing it past the
request's timeout). A run therefore costs its own work, not ~2.6 s of imports on the reference machine.

``train_py(args, ...)`` (the client, used through ``conftest.train_py``) returns a
``subprocess.CompletedProcess`` like ``subprocess.run([python, scripts/train.py, *args], capture_output=True,
text=True)`` would. ``ANYTOPO_TEST_REAL_TRAIN=1`` makes every call a real fresh interpreter instead.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "scripts" / "train.py")
ALL_REAL = os.environ.get("ANYTOPO_TEST_REAL_TRAIN") == "1"


# ------------------------------------------------------------------------------------------- server

def serve() -> None:
    import importlib

    import launcher
    import training

    for name in ("torch", "torchvision", "training.app", "training.data", "training.trainer", "checkpoint.manager"):
        importlib.import_module(name)  # the point: everything a run imports, imported once, here

    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                os.chdir(req["cwd"])
                os.environ.clear()
                os.environ.update(req["env"])
                for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(target, fd)
                    os.close(target)
                if req.get("fsize") is not None:  # a disk that fills at this many bytes (the full-disk tests)
                    import resource

                    resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG instead
                sys.argv = [TRAIN, *req["args"]]
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                if req.get("preamble"):  # the test's own patches (e.g. a spy on the checkpoint manager)
                    exec(compile(req["preamble"], "<preamble>", "exec"), {"__name__": "__preamble__"})
                launcher.run_main(training.cli)
            except SystemExit as e:  # run_main's sys.exit: end as the interpreter would, then leave the fork
                launcher.exit_process(e.code, skip_finalization=True)
            finally:
                os._exit(70)  # not reached: exit_process ends the process
        deadline = time.monotonic() + req["timeout"]
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                timed_out, status = True, -signal.SIGKILL
                break
            time.sleep(0.005)
        rc = status if timed_out else os.waitstatus_to_exitcode(status)
        sys.stdout.write(json.dumps({"rc": rc, "timed_out": timed_out}) + "\n")
        sys.stdout.flush()


# ------------------------------------------------------------------------------------------- client

class _Server:
    """The one warm server of this test process, started on first use and restarted if it died."""

    proc: subprocess.Popen | None = None
    lock = threading.Lock()

    @classmethod
    def request(cls, req: dict, env: dict[str, str], timeout: float) -> dict:
        with cls.lock:
            if cls.proc is None or cls.proc.poll() is not None:
                cls.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            text=True, cwd=REPO, env=env)
            cls.proc.stdin.write(json.dumps(req) + "\n")
            cls.proc.stdin.flush()
            line = cls.proc.stdout.readline()
            if not line:
                cls.proc = None
                raise RuntimeError("the warm training server died; rerun with ANYTOPO_TEST_REAL_TRAIN=1 to see why")
            return json.loads(line)


def train_py(args: list[str], *, env: dict[str, str], timeout: float = 240, cwd: str | Path = REPO,
             fsize: int | None = None, preamble: str | None = None) -> subprocess.CompletedProcess:
    """``scripts/train.py *args`` in a fresh process forked from the warm server (see the module docstring);
    ``fsize``: the run's file-size limit in bytes (RLIMIT_FSIZE, SIGXFSZ ignored: writes past it fail);
    ``preamble``: Python code the process runs first (a test's patches)."""
    args = [str(a) for a in args]
    if ALL_REAL and preamble:
        code = f"{preamble}\nimport runpy, sys\nsys.argv = [{TRAIN!r}] + sys.argv[1:]\nrunpy.run_path({TRAIN!r}, run_name='__main__')"
        return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    if ALL_REAL:
        def limit() -> None:
            if fsize is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

        return subprocess.run([sys.executable, TRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, preexec_fn=limit)
    with tempfile.TemporaryDirectory(prefix="anytopo-warm-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        req = {"args": args, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err), "timeout": timeout,
               "fsize": fsize, "preamble": preamble}
        reply = _Server.request(req, env, timeout)
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
    if reply["timed_out"]:
        raise subprocess.TimeoutExpired([TRAIN, *args], timeout, stdout, stderr)
    return subprocess.CompletedProcess([sys.executable, TRAIN, *args], reply["rc"], stdout, stderr)


if __name__ == "__main__":
    serve()
