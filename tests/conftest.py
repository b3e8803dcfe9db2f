"""Shared test fixtures.

Tests run on CPU. Multi-process tests launch real processes (torchrun, accelerate, spawn) with gloo.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
BIN = Path(sys.executable).parent

# scripts/ holds the training entry and its sibling modules (data, tasks); tests import them.
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """Environment for launched children: one thread each (2 cores here), no inherited launcher vars."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "GROUP_", "MASTER_", "TORCHELASTIC",
                                "ACCELERATE_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore::UserWarning")
    env.update(extra)
    return env


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    """Directory holding this venv's console scripts (torchrun, accelerate, anytopo-ckpt)."""
    return BIN
