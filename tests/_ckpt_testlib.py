"""Shared helpers for the checkpoint format and bad-input tests: a small model and a CLI runner.

The CLI runner has two modes. ``real=True`` launches ``python -m checkpoint`` as a user would (fresh
interpreter, real stderr, real exit status). The default runs ``checkpoint.cli.main`` in this process,
reproducing what a user would see: warnings are printed to stderr as the interpreter would print them,
an exception that escapes ``main`` becomes a traceback on stderr and exit status 1, and argparse's
``SystemExit`` becomes the exit status. Starting a fresh interpreter costs seconds (``import torch``), so
the matrices run in-process and a few tests per file launch real processes. Set
``ANYTOPO_TEST_REAL_CLI=1`` to launch a real process for every call.
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
ALL_REAL = os.environ.get("ANYTOPO_TEST_REAL_CLI") == "1"


# ------------------------------------------------------------------------------------------- models

def small_net(seed: int = 0) -> nn.Sequential:
    """Linear + BatchNorm + ReLU + Linear: parameters and buffers (running stats, an int64 counter).

    Large enough (about 3.8 KB of tensors) that a "1KB" shard limit splits it.
    """
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8))


def trained_net(seed: int = 0) -> nn.Sequential:
    """``small_net`` whose BatchNorm statistics moved away from their defaults, returned in eval mode."""
    model = small_net(seed)
    model.train()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 16, generator=g) * 3 + 1)
    return model.eval()


def net_input() -> torch.Tensor:
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(1))


def outputs(model: nn.Module) -> torch.Tensor:
    """Eval-mode output on the fixed input."""
    model.eval()
    with torch.no_grad():
        return model(net_input())


def fresh_net_differs(source: nn.Module) -> nn.Sequential:
    """A new ``small_net`` whose output differs from ``source`` (so a passing load proves something)."""
    model = small_net(seed=12345)
    assert not torch.equal(outputs(model), outputs(source))
    return model


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as integers, so NaN payloads and -0.0 compare exactly."""
    t = t.contiguous()
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    if t.is_floating_point():
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype, k
        assert g.shape == w.shape, k
        assert torch.equal(bits(g), bits(w)), k


# ---------------------------------------------------------------------------------------------- CLI

def _real_env() -> dict[str, str]:
    # A user's environment: no warning filters inherited from the test run.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_cli(*args: object, real: bool = False, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``python -m checkpoint ARGS``; returns returncode, stdout, stderr (text)."""
    argv = [str(a) for a in args]
    if real or ALL_REAL:
        return subprocess.run([sys.executable, "-m", "checkpoint", *argv], cwd=cwd, env=_real_env(),
                              capture_output=True, text=True, timeout=300)
    from checkpoint.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd = os.getcwd()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        # The interpreter's default filters: show each warning, hide the deprecation kinds.
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        os.chdir(cwd)
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # what the interpreter prints for an uncaught exception
            traceback.print_exc(file=err)
            code = 1
        finally:
            os.chdir(old_cwd)
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
    return subprocess.CompletedProcess(["checkpoint", *argv], code, out.getvalue(), shown + err.getvalue())


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, and stderr is exactly one non-empty line ``error: ...`` containing every needle; no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line on stderr, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line
