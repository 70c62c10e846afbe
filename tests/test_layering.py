"""Layers call down, never up (STYLE.md): pyshmfeed's imports, read from the source with ``ast``.

Each module of the package belongs to one layer. A module may import its own
layer and the layers below, never one above, not even lazily inside a
function or under ``TYPE_CHECKING`` (a type from above is a small
``Protocol`` instead, like ``pyshmfeed.stage.StagedFeed``). And no module
uses another module's private names: it neither imports ``_name`` from
another module nor reads ``x._name`` where ``_name`` belongs to another
module of the package (parts receive what they need; nobody reaches into
anyone else's attributes).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyshmfeed"

# Bottom first. A module is named by its first component under pyshmfeed: "stage" is the whole
# pyshmfeed/stage/ package, "adapters" every front end in pyshmfeed/adapters/.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("the ring and what describes it", ("errors", "_ffi", "_ffi_build", "_shmfeed_cffi", "registry", "views", "ring",
                                        "spec", "work", "stats")),
    # raydata turns a ray.data.Dataset into a shards source; Feed.from_ray_dataset calls it.
    ("what producers run", ("source", "producer", "raydata")),
    ("running producers", ("procs", "hosts", "raylife", "autotune", "supervisor", "dispatch", "remote")),
    ("the consumer thread", ("stage",)),
    ("the feed", ("feed",)),
    ("front ends and tools", ("__init__", "__main__", "torch", "adapters", "cli", "bench", "doctor",
                              "inspect_rings", "cleanup")),
]
LAYER_OF = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}

# Private names used across modules on purpose: (module, name) with why. None today; keep it that way.
KNOWN_PRIVATE_USES: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    """Dotted name under pyshmfeed ("ring", "stage.core", "stage" for its __init__) -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _component(module: str) -> str:
    return module.split(".")[0]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_of(module: str, path: Path) -> list[str]:
    parts = [] if module == "__init__" else module.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def _imports(module: str, path: Path, tree: ast.AST):
    """(line, imported module, names imported from it) for every import of a pyshmfeed module."""
    package = _package_of(module, path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "pyshmfeed" or alias.name.startswith("pyshmfeed."):
                    yield node.lineno, alias.name[len("pyshmfeed."):] or "__init__", ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module == "pyshmfeed" or (node.module or "").startswith("pyshmfeed."):
                target = node.module[len("pyshmfeed."):] if node.module != "pyshmfeed" else ""
            else:
                continue
            names = []
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                if sub in MODULES or _component(sub) == "_shmfeed_cffi":
                    yield node.lineno, sub, ()   # a submodule: `from . import errors`
                else:
                    names.append(alias.name)
            if names:
                yield node.lineno, target or "__init__", tuple(names)


def _defined_private_names(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, variables, attributes it assigns on ``self``
    or ``cls`` (not on other objects: that is writing someone else's), keywords (``set_defaults(_run=...)``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
    return {n for n in names if _is_private(n)}


TREES = {module: ast.parse(path.read_text(), str(path)) for module, path in MODULES.items()}
DEFINED = {module: _defined_private_names(tree) for module, tree in TREES.items()}


def upward_imports(module: str, path: Path, tree: ast.AST) -> list[str]:
    own = LAYER_OF[_component(module)]
    found = []
    for line, target, _ in _imports(module, path, tree):
        rank = LAYER_OF.get(_component(target))
        if rank is None:
            found.append(f"line {line}: {target}, which has no layer")
        elif rank > own:
            found.append(f"line {line}: {target} ({LAYERS[rank][0]}, above {LAYERS[own][0]})")
    return found


def private_uses(module: str, path: Path, tree: ast.AST) -> list[str]:
    """``from m import _x``, ``m._x`` for a pyshmfeed module ``m``, and ``obj._x`` (``obj`` not self or
    cls) where ``_x`` is defined by another module of the package and not by this one."""
    others = set().union(*(names for m, names in DEFINED.items() if m != module))
    own = _defined_private_names(tree)
    module_aliases = {}  # local name -> the pyshmfeed module it is bound to (`from . import errors`)
    uses = []
    for line, target, names in _imports(module, path, tree):
        if not names:
            module_aliases[target.split(".")[-1]] = target
        uses += [(line, target, name) for name in names if _is_private(name) and target != module]
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
            continue
        receiver = node.value
        if isinstance(receiver, ast.Name) and receiver.id in module_aliases:
            uses.append((node.lineno, module_aliases[receiver.id], node.attr))
        elif isinstance(receiver, ast.Name) and receiver.id in ("self", "cls"):
            continue
        elif node.attr not in own and node.attr in others:
            owners = sorted(m for m, names in DEFINED.items() if m != module and node.attr in names)
            uses.append((node.lineno, " or ".join(owners), node.attr))
    return [f"line {line}: {name} of {target}" for line, target, name in sorted(uses)
            if (module, name) not in KNOWN_PRIVATE_USES]


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if _component(m) not in LAYER_OF)
    assert not unplaced, f"put these modules in a layer of LAYERS: {unplaced}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_module_above_it(module):
    found = upward_imports(module, MODULES[module], TREES[module])
    assert not found, f"pyshmfeed.{module} imports upward: " + "; ".join(found)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_uses_another_modules_private_names(module):
    found = private_uses(module, MODULES[module], TREES[module])
    assert not found, f"pyshmfeed.{module} uses private names of other modules: " + "; ".join(found)


def test_the_checks_catch_what_they_are_for():
    """The two checks on a made-up stage module that does everything this file forbids."""
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "from .. import ring\n"
                     "if TYPE_CHECKING:\n"
                     "    from ..feed import Feed\n"
                     "def f(feed):\n"
                     "    from ..raydata import _columns\n"
                     "    feed._undelivered = None\n"
                     "    return feed._delivered_seqs, ring._view\n")
    path = PACKAGE / "stage" / "core.py"
    assert upward_imports("stage.core", path, tree) == ["line 4: feed (the feed, above the consumer thread)"]
    assert private_uses("stage.core", path, tree) == ["line 6: _columns of raydata", "line 7: _undelivered of feed",
                                                      "line 8: _delivered_seqs of feed", "line 8: _view of ring"]
