"""The package's layers import one way only, and its subpackages import each other without a cycle.

Every `import` and `from ... import` of every module counts, wherever it stands: at the top, inside
functions, under `if TYPE_CHECKING:` (a lazy import still ties the lower layer to the higher one).
Relative imports are resolved against the importing module's package.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "titans_pretrain"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# A unit imports its own layer or lower ones, never up: each layer works without what is built on it.
LAYERS = {
    "config": 0,
    "models": 1, "data": 1,
    "distributed": 2,
    "train": 3,
    "eval": 4, "hf": 4, "profile": 4, "launch": 4, "integrations": 4,
    "cli": 5, "config_cli": 5, "__main__": 5, "__init__": 5,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The subpackage (or top-level module) of ``titans_pretrain.X...``; ``__init__`` for the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def _nodes(tree: ast.AST, runtime_only: bool):
    """Every node of ``tree``; with ``runtime_only``, not those under ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if runtime_only and _is_type_checking(node):
            todo += node.orelse
        else:
            todo += ast.iter_child_nodes(node)


def _imports(source: str, module: str, is_package: bool, known: set[str],
             runtime_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) for each import of a ``titans_pretrain`` module anywhere in ``source``
    (``runtime_only``: not the annotation-only ones under ``if TYPE_CHECKING:``)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in _nodes(ast.parse(source), runtime_only):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # `from titans_pretrain import train` imports the subpackage, not the package's __init__
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in known else target))
    return sorted({(line, name) for line, name in found if name == PACKAGE or name.startswith(PACKAGE + ".")})


def _graph() -> tuple[dict[tuple[str, str], list[str]], list[str]]:
    """{(unit, imported unit): ["file:line", ...]} over units that differ, and the files of unknown units."""
    files = sorted(ROOT.rglob("*.py"))
    known = {_module_name(f) for f in files}
    edges: dict[tuple[str, str], list[str]] = {}
    unknown = []
    for path in files:
        module = _module_name(path)
        source_unit = _unit(module)
        where = path.relative_to(ROOT.parent)
        if source_unit not in LAYERS:
            unknown.append(f"{where}: unit {source_unit!r}")
        for line, target in _imports(path.read_text(), module, path.name == "__init__.py", known):
            target_unit = _unit(target)
            if target_unit not in LAYERS:
                unknown.append(f"{where}:{line}: imports {target} (unit {target_unit!r})")
            elif target_unit != source_unit:
                edges.setdefault((source_unit, target_unit), []).append(f"{where}:{line} imports {target}")
    return edges, unknown


def test_every_unit_has_a_layer():
    _, unknown = _graph()
    assert not unknown, "add these to LAYERS in tests/test_layers.py:\n" + "\n".join(unknown)


def test_no_import_goes_up_a_layer():
    edges, _ = _graph()
    offenders = [f"{site} ({src}, layer {LAYERS[src]} -> {dst}, layer {LAYERS[dst]})"
                 for (src, dst), sites in sorted(edges.items())
                 if src in LAYERS and dst in LAYERS and LAYERS[dst] > LAYERS[src]
                 for site in sites]
    assert not offenders, ("imports from a lower layer to a higher one (move the code down, or the "
                           "caller up):\n" + "\n".join(offenders))


def test_units_import_each_other_without_a_cycle():
    edges, _ = _graph()
    succ: dict[str, set[str]] = {}
    for src, dst in edges:
        succ.setdefault(src, set()).add(dst)
    cycle = _find_cycle(succ)
    assert cycle is None, ("subpackages import each other in a cycle: " + " -> ".join(cycle) + "\n"
                           + "\n".join(s for a, b in zip(cycle, cycle[1:]) for s in edges[(a, b)]))


def _find_cycle(succ: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(succ.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(succ):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_function_level_import_dodges_a_cycle_between_modules():
    """Run-time imports between modules, the ones inside functions included, form no cycle: every
    lazy import could stand at the top (lazy ones are for optional packages and start-up time)."""
    files = sorted(ROOT.rglob("*.py"))
    known = {_module_name(f) for f in files}
    succ: dict[str, set[str]] = {}
    sites: dict[tuple[str, str], str] = {}
    for path in files:
        module = _module_name(path)
        for line, target in _imports(path.read_text(), module, path.name == "__init__.py", known,
                                     runtime_only=True):
            if target in known and target != module:
                succ.setdefault(module, set()).add(target)
                sites.setdefault((module, target), f"{path.relative_to(ROOT.parent)}:{line}")
    cycle = _find_cycle(succ)
    assert cycle is None, ("modules import each other in a cycle: " + " -> ".join(cycle) + "\n"
                           + "\n".join(sites[(a, b)] for a, b in zip(cycle, cycle[1:])))


def test_the_scan_sees_lazy_type_checking_and_relative_imports():
    source = ("from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from titans_pretrain.models import X\n"
              "def f():\n    import titans_pretrain.train.trainer\n    from ..launch import local\n"
              "    from . import slurm\n    from titans_pretrain import hf\n")
    known = {"titans_pretrain.launch.local", "titans_pretrain.distributed.slurm", "titans_pretrain.hf"}
    found = _imports(source, "titans_pretrain.distributed.mesh", False, known)
    assert found == [(3, "titans_pretrain.models"), (5, "titans_pretrain.train.trainer"),
                     (6, "titans_pretrain.launch.local"), (7, "titans_pretrain.distributed.slurm"),
                     (8, "titans_pretrain.hf")]
    runtime = _imports(source, "titans_pretrain.distributed.mesh", False, known, runtime_only=True)
    assert runtime == found[1:]
