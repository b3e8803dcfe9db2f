"""The import direction the project promises (README, STYLE): scripts -> launcher, models, checkpoint.

launcher knows nothing of checkpoints or models; models knows nothing of distribution and reads weights
through checkpoint only lazily (inside the weights= loader); checkpoint knows nothing of training and
imports models only lazily (inside the CLI's verify); the data and task modules are topology-agnostic.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(top-level packages imported anywhere, those imported at module level) by one source file."""
    tree = ast.parse(path.read_text())

    def names(nodes) -> set[str]:
        out = set()
        for n in nodes:
            if isinstance(n, ast.Import):
                out |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                out.add(n.module.split(".")[0])
        return out

    return names(ast.walk(tree)), names(tree.body)


RULES = [  # (files, never imported, not imported at module level)
    ("launcher/*.py", {"checkpoint", "models"}, set()),
    ("models/*.py", {"launcher"}, {"checkpoint"}),
    ("checkpoint/*.py", {"launcher"}, {"models"}),
    ("scripts/data.py", {"checkpoint", "launcher", "models"}, set()),
    ("scripts/tasks.py", {"checkpoint", "launcher", "models"}, set()),
]


@pytest.mark.parametrize("pattern,never,not_eager", RULES, ids=[r[0] for r in RULES])
def test_import_direction(pattern, never, not_eager):
    files = sorted(REPO.glob(pattern))
    assert files, pattern
    for f in files:
        anywhere, eager = imports(f)
        assert not anywhere & never, f"{f.relative_to(REPO)} imports {anywhere & never}"
        assert not eager & not_eager, f"{f.relative_to(REPO)} imports {eager & not_eager} at module level"
