"""The import structure README's "Layout" promises, read from README's two tables themselves.

1. The packages table: each row's "knows nothing of" column is a list of concerns; VOCABULARY says which
   modules each concern is. No file of that row may import any of them, anywhere in the file (a
   function-level import counts). The one exception README states under the table -- ``checkpoint`` imports
   ``models`` only lazily, inside its CLI -- is enforced as written.
2. The ``checkpoint/`` layers table: every module of the package is in exactly one layer, and imports (at
   module level or inside a function) only modules of lower layers. So the package's import graph runs one
   way, and no circle can be closed by a function-local import.
3. Everywhere (every package of the project): no import circles, and no module imports another module's
   private (``_``) names or reads them as ``module._name``.

Editing a table changes what is enforced; a concern the vocabulary does not know fails the test.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("checkpoint", "collective", "launcher", "models", "training")
VOCABULARY = {  # concern named in README -> module names (a dotted name also forbids its submodules)
    "distribution": {"launcher", "torch.distributed", "collective"},
    "checkpoints": {"checkpoint"},
    "models": {"models"},
    "launcher": {"launcher"},
    "training": {"training"},
}
LAZY_SENTENCE = ("`checkpoint` imports `models` only lazily,\ninside its CLI (`verify`, `convert --model`).")


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(dotted modules imported anywhere, those imported at module level) by one source file; relative
    imports are resolved against the file's package."""
    tree = ast.parse(path.read_text())
    package = path.parent.name

    def names(nodes) -> set[str]:
        out = set()
        for n in nodes:
            if isinstance(n, ast.Import):
                out |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom):
                base = n.module if n.level == 0 else ".".join(filter(None, [package, n.module]))
                if base:
                    out |= {base} | {f"{base}.{a.name}" for a in n.names}
        return out

    return names(ast.walk(tree)), names(tree.body)


def hits(imported: set[str], forbidden: set[str]) -> set[str]:
    return {m for m in imported for f in forbidden if m == f or m.startswith(f + ".")}


def readme_table(heading: str, first_cell: str) -> list[list[str]]:
    """The rows (cells stripped) of README's table under ``heading`` whose header's first cell is ``first_cell``."""
    section = (REPO / "README.md").read_text().split(heading, 1)[1]
    for block in section.split("\n\n"):
        lines = [line for line in block.strip().splitlines() if line.startswith("|")]
        if lines and lines[0].strip("|").split("|")[0].strip() == first_cell:
            return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[2:]]
    raise AssertionError(f"README has no table starting with {first_cell!r} under {heading!r}")


def layout_rows() -> list[tuple[list[str], list[str]]]:
    """(path globs, concerns) of each README Layout row that names concerns."""
    rows = []
    for path_cell, _, nothing_of in readme_table("## Layout", "path"):
        if nothing_of in ("—", "-", ""):
            continue
        globs = []
        for p in re.findall(r"`([^`]+)`", path_cell):
            if "/" not in p and globs:  # `launcher/launch.py`, `preflight.py`: beside the first one
                p = str(Path(globs[0]).parent / p)
            globs.append(p.rstrip("/") + ("/*.py" if p.endswith("/") else ""))
        rows.append((globs, [c.strip() for c in nothing_of.split(",")]))
    return rows


def checkpoint_layers() -> dict[str, int]:
    """checkpoint module name -> its layer, from README's layers table."""
    layers = {}
    for layer, modules, _ in readme_table("## Layout", "layer"):
        for m in re.findall(r"`([^`]+)`", modules):
            assert m not in layers, f"README lists checkpoint/{m}.py in two layers"
            layers[m] = int(layer)
    return layers


def project_files() -> list[Path]:
    return sorted(f for pkg in PACKAGES for f in (REPO / pkg).glob("*.py"))


def module_name(f: Path) -> str:
    return f"{f.parent.name}.{f.stem}" if f.stem != "__init__" else f.parent.name


ROWS = layout_rows()


def test_table_is_read_and_every_concern_is_known():
    assert len(ROWS) >= 6, ROWS  # models, collective, launcher x2, checkpoint, data/tasks
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
        own = {module_name(f).split(".")[0]}  # a package's own modules are not "another" concern
        bad = {m for m in hits(anywhere, forbidden) if m.split(".")[0] not in own}
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


def test_every_checkpoint_module_has_a_layer_and_imports_only_lower_layers():
    layers = checkpoint_layers()
    files = {f.stem: f for f in (REPO / "checkpoint").glob("*.py") if f.stem not in ("__init__", "__main__")}
    assert set(layers) == set(files), (f"README's layers table and checkpoint/ differ: only in README "
                                       f"{sorted(set(layers) - set(files))}, only on disk {sorted(set(files) - set(layers))}")
    for name, f in sorted(files.items()):
        anywhere, _ = imports(f)
        for m in sorted(hits(anywhere, {"checkpoint"})):
            parts = m.split(".")
            target = parts[1] if len(parts) > 1 and parts[1] in layers else None
            if target is None or target == name:
                continue  # `from checkpoint import X` of a public name, or the package itself
            assert layers[target] < layers[name], (f"checkpoint/{name}.py (layer {layers[name]}) imports {target} "
                                                   f"(layer {layers[target]}): only lower layers may be imported")


def project_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file)."""
    modules = {module_name(f): f for f in project_files()}
    graph = {}
    for name, f in modules.items():
        anywhere, _ = imports(f)
        deps = set()
        for m in anywhere:
            while m and m not in modules:
                m = m.rpartition(".")[0]
            if m and m != name and m != name.rpartition(".")[0]:
                deps.add(m)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for d in sorted(graph.get(node, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d] if d in path else [node, d]
            if d not in state and (found := visit(d, path + [d])):
                return found
        state[node] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n, [n])):
            return found
    return None


def test_no_import_circles_anywhere():
    graph = project_graph()
    # a package's __init__ re-exports its modules (and checkpoint's lazily): leave those edges out
    for pkg in PACKAGES:
        graph[pkg] = set()
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def private_crossings(f: Path, project: set[str]) -> list[str]:
    """``from x import _name`` of another project module, and ``mod._name`` of an imported project module."""
    tree = ast.parse(f.read_text())
    package, me = f.parent.name, module_name(f)
    bad, aliases = [], set()
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            base = n.module if n.level == 0 else ".".join(filter(None, [package, n.module]))
            if not base or base.split(".")[0] not in PACKAGES:
                continue
            for a in n.names:
                full = f"{base}.{a.name}"
                if full in project:  # a module: remember its local name
                    aliases.add(a.asname or a.name)
                elif a.name.startswith("_") and not a.name.startswith("__") and base != me:
                    bad.append(f"from {base} import {a.name}")
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name in project and a.asname:
                    aliases.add(a.asname)
    for n in ast.walk(tree):
        if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
                and n.attr.startswith("_") and not n.attr.startswith("__")):
            bad.append(f"{n.value.id}.{n.attr}")
    return bad


def test_no_private_names_cross_modules():
    project = {module_name(f) for f in project_files()}
    found = {str(f.relative_to(REPO)): b for f in project_files() if (b := private_crossings(f, project))}
    assert not found, f"private names used across modules: {found}"


def test_the_rules_catch_a_violation(tmp_path):
    """The checkers themselves: a function-level import is found, dotted names match their packages, a
    circle is found, and a private name read from another module is found."""
    f = tmp_path / "x.py"
    f.write_text("import os\ndef g():\n    import checkpoint.errors\n    from torch.distributed import barrier\n")
    anywhere, eager = imports(f)
    assert hits(anywhere, {"checkpoint", "torch.distributed"}) == {
        "checkpoint.errors", "torch.distributed", "torch.distributed.barrier"}
    assert not hits(eager, {"checkpoint"}) and not hits({"torchvision"}, {"torch"})
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    pkg = tmp_path / "checkpoint"
    pkg.mkdir()
    g = pkg / "y.py"
    g.write_text("from .storage import _umask\nfrom . import gather\ndef h():\n    return gather._pwrite_all\n")
    assert private_crossings(g, {"checkpoint.storage", "checkpoint.gather"}) == [
        "from checkpoint.storage import _umask", "gather._pwrite_all"]
