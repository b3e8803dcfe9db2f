"""The import direction README's "Layout" table promises, read from the table itself.

Each row's "knows nothing of" column is a list of concerns; VOCABULARY says which modules each concern is.
No file of that row may import any of them, anywhere in the file (a function-level import counts). The one
exception the README states under the table -- ``checkpoint`` imports ``models`` only lazily, inside its
CLI -- is enforced as written: checkpoint/cli.py imports models only inside functions, no other checkpoint
file imports it at all. Editing the table changes what is enforced; a concern the vocabulary does not know
fails the test rather than being ignored.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

VOCABULARY = {  # concern named in README -> module names (a dotted name also forbids its submodules)
    "distribution": {"launcher", "torch.distributed"},
    "checkpoints": {"checkpoint"},
    "models": {"models"},
    "launcher": {"launcher"},
    "training": {"train", "data", "tasks", "reporting", "demo"},  # scripts/: the modules of a training run
}
LAZY_SENTENCE = ("`checkpoint` imports `models` only lazily,\ninside its CLI (`verify`, `convert --model`).")


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(dotted modules imported anywhere, those imported at module level) by one source file."""
    tree = ast.parse(path.read_text())

    def names(nodes) -> set[str]:
        out = set()
        for n in nodes:
            if isinstance(n, ast.Import):
                out |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                out |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
        return out

    return names(ast.walk(tree)), names(tree.body)


def hits(imported: set[str], forbidden: set[str]) -> set[str]:
    return {m for m in imported for f in forbidden if m == f or m.startswith(f + ".")}


def layout_rows() -> list[tuple[list[str], list[str]]]:
    """(path globs, concerns) of each README Layout row that names concerns."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n\n", 2)[1]
    rows = []
    for line in table.splitlines()[2:]:
        path_cell, _, nothing_of = [c.strip() for c in line.strip("|").split("|")]
        if nothing_of in ("—", "-", ""):
            continue
        globs = [p.rstrip("/") + ("/*.py" if p.endswith("/") else "") for p in re.findall(r"`([^`]+)`", path_cell)]
        rows.append((globs, [c.strip() for c in nothing_of.split(",")]))
    return rows


ROWS = layout_rows()


def test_table_is_read_and_every_concern_is_known():
    assert len(ROWS) >= 4, ROWS  # models, launcher, checkpoint, data/tasks
    for _, concerns in ROWS:
        unknown = [c for c in concerns if c not in VOCABULARY]
        assert not unknown, f"README names {unknown}: add them to VOCABULARY (which modules are they?)"


@pytest.mark.parametrize("globs,concerns", ROWS, ids=[",".join(g) for g, _ in ROWS])
def test_row_imports_nothing_it_knows_nothing_of(globs, concerns):
    forbidden = set().union(*(VOCABULARY[c] for c in concerns))
    files = sorted({f for g in globs for f in REPO.glob(g)})
    assert files, globs
    for f in files:
        anywhere, _ = imports(f)
        bad = hits(anywhere, forbidden)
        assert not bad, f"{f.relative_to(REPO)} imports {sorted(bad)}, but README says it knows nothing of {concerns}"


def test_checkpoint_imports_models_only_lazily_in_its_cli():
    assert LAZY_SENTENCE in (REPO / "README.md").read_text()  # the promise this test enforces
    for f in sorted((REPO / "checkpoint").glob("*.py")):
        anywhere, eager = imports(f)
        if f.name == "cli.py":
            assert hits(anywhere, {"models"}), "cli.py should build models for verify/convert --model"
            assert not hits(eager, {"models"}), "checkpoint/cli.py imports models at module level"
        else:
            assert not hits(anywhere, {"models"}), f"{f.relative_to(REPO)} imports models"


def test_the_rules_catch_a_violation(tmp_path):
    """The checker itself: a function-level import is found, and dotted names match their packages."""
    f = tmp_path / "x.py"
    f.write_text("import os\ndef g():\n    import checkpoint.errors\n    from torch.distributed import barrier\n")
    anywhere, eager = imports(f)
    assert hits(anywhere, {"checkpoint", "torch.distributed"}) == {
        "checkpoint.errors", "torch.distributed", "torch.distributed.barrier"}
    assert not hits(eager, {"checkpoint"}) and not hits({"torchvision"}, {"torch"})
