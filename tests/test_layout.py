"""The house's rules, checked on the source (../shared/DESIGN.md, docs/contributing.md): thin scripts, no import
cycles (imports inside functions counted, and the package __init__ every `kd.a.b` import runs), no private names
imported across modules, few function-level imports and each with its reason, the teacher's outputs the cache's
fields."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from conftest import ROOT

KD = Path(ROOT) / "kd"
# the passes are front doors: each reads top to bottom in one screen (docstring included); the top-level scripts of a
# clone are shims over the same entry points (kd/cli.py), nothing more
SCRIPT_BUDGETS = {
    "kd/cache_teacher.py": 150,
    "kd/train_student.py": 120,
    "cache_teacher.py": 12,
    "train_student.py": 12,
}
MAX_FUNCTION_LEVEL_IMPORTS = 10


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(KD.rglob("*.py")):
        parts = path.relative_to(KD.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(mods: dict[str, Path]):
    """(importer, imported module, names, line, inside a function) for every import of a kd module."""

    def target(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    found = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

        def in_function(node, parents=parents) -> bool:
            while node in parents:
                node = parents[node]
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    return True
            return False

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(target(a.name), []) for a in node.names if a.name.startswith("kd")]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("kd"):
                # `from kd import prune` imports the module kd.prune; `from kd.cache import X` the package
                targets = [
                    (f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else target(node.module), [a.name])
                    for a in node.names
                ]
            else:
                continue
            for t, names in targets:
                if t is not None and t != name:
                    found.append((name, t, names, node.lineno, in_function(node)))
    return found


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules importing it runs: the target and every package above it (their __init__ runs
    first), except the importer's own packages (already being initialised)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for src, dst, _, _, _ in _imports(mods):
        edges[src].add(dst)
        parent = dst
        while "." in parent:
            parent = parent.rpartition(".")[0]
            if parent in mods and not (src == parent or src.startswith(parent + ".")):
                edges[src].add(parent)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_modules():
    assert _cycles(_edges(_modules())) == []


def test_no_import_cycles_between_packages():
    """kd.cache, kd.data, kd.losses, kd.train, ... and the top-level modules as nodes. A package's __main__ (a command:
    `python -m kd.prune`) is an entry point nothing imports, so it may import any package."""
    mods = _modules()

    def package(m: str) -> str:
        return ".".join(m.split(".")[:2])

    edges: dict[str, set[str]] = {}
    for src, dsts in _edges(mods).items():
        if src.endswith(".__main__"):
            continue
        for dst in dsts:
            if package(src) != package(dst):
                edges.setdefault(package(src), set()).add(package(dst))
    assert _cycles(edges) == []


def test_a_cycle_is_found_where_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_names_imported_across_modules():
    private = [
        (src, dst, n)
        for src, dst, names, _, _ in _imports(_modules())
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert private == []


def test_function_level_imports_are_few_and_say_why():
    mods = _modules()
    inside = {(src, line) for src, _, _, line, fn in _imports(mods) if fn}
    assert len(inside) <= MAX_FUNCTION_LEVEL_IMPORTS, sorted(inside)
    for src, line in inside:
        text = mods[src].read_text().splitlines()[line - 1]
        assert "#" in text, f"{src}:{line} imports a kd module inside a function without a one-line reason"


def test_the_scripts_stay_thin():
    for script, budget in SCRIPT_BUDGETS.items():
        lines = len((Path(ROOT) / script).read_text().splitlines())
        assert lines <= budget, f"{script} has {lines} lines (budget {budget}): move the new code into kd/"


def test_the_teacher_outputs_are_the_cache_fields():
    """kd.teacher.TeacherOutputs, what the caching pass hands the writer, has one attribute per stored field: every
    field of the table (the sampled targets' ids and counts, the text and its spans) and the per-sequence whole-shard
    datasets."""
    from kd.cache.format import FIELDS, SHARD_DATASETS
    from kd.teacher import TeacherOutputs

    stored = {name for f in FIELDS for name in f.names}
    stored |= set(SHARD_DATASETS) - {"sample_offsets"}  # the ragged codec's offsets are its own, not a field
    assert {f.name for f in dataclasses.fields(TeacherOutputs)} == stored
