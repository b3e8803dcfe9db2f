"""Shared test fixtures.

Tests run on CPU. Multi-process tests launch real processes (torchrun, accelerate, spawn) with gloo.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from _common import child_env, free_port  # noqa: F401 -- bench/_common.py: shared with the bench scripts

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    """Directory holding this venv's console scripts (torchrun, accelerate, anytopo-ckpt)."""
    return BIN


def train_py(args: list, *, timeout: float = 240, fsize: int | None = None, cwd: Path = REPO,
             preamble: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """``python scripts/train.py *args`` with ``child_env(**env)``, run by a process forked from a warm
    interpreter (tests/_warm.py: the same code path, without ~2.6 s of imports per run);
    ``ANYTOPO_TEST_REAL_TRAIN=1`` runs a fresh interpreter each time. ``fsize``: a file-size limit in bytes;
    ``preamble``: code the run executes first (a test's patches)."""
    from _warm import train_py as run

    return run(list(args), env=child_env(**env), timeout=timeout, cwd=cwd, fsize=fsize, preamble=preamble)
