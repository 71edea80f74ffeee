"""The layers of DESIGN.md: imports point one way, down the list, and there is no import cycle.

Statically, every ``bdiff`` import in every module (function-level ones included) goes to its own
layer or a lower one; ``bdiff/sampling`` imports neither Pyro nor Lightning; the import-time
graph of modules has no cycle. At run time, a fresh interpreter imports the layers in order (every
submodule) and no module of a higher layer is loaded along the way.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "bdiff"
LAYERS: list[tuple[str, ...]] = [  # DESIGN.md's order, plus where the small top-level modules sit
    ("bdiff.checks", "bdiff.cache", "bdiff.files", "bdiff.schedule"),  # argument checks; the cache folder; atomic writes; the schedule maths
    ("bdiff.nets", "bdiff.denoiser", "bdiff.critic"),  # networks, the Denoiser seam
    ("bdiff.bayes", "bdiff.checkpoint"),  # Pyro; a checkpoint builds a Bayesian denoiser
    ("bdiff.sampling",),
    ("bdiff.metrics", "bdiff.viz", "bdiff.wandb_log"),
    ("bdiff.lit",),
    ("bdiff.analysis", "bdiff.sample", "bdiff.evaluate", "bdiff.recalibrate", "bdiff.scripts"),  # entry points
]


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def layer(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None  # the package root ``bdiff``


def imports(tree: ast.AST, import_time_only: bool = False) -> set[str]:
    """Imported module names; with ``import_time_only``, not those in functions or ``if __name__ == "__main__"``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if import_time_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return
        if import_time_only and isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # ``from bdiff.x import submodule``
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


MODULES = {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer() -> None:
    assert [m for m in MODULES if m != "bdiff" and layer(m) is None] == []


def test_imports_point_down_the_layers() -> None:
    upward = []
    for module, tree in MODULES.items():
        mine = layer(module)
        for target in imports(tree):
            theirs = layer(target) if target.startswith("bdiff.") else None
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_sampling_knows_neither_pyro_nor_lightning() -> None:
    for module, tree in MODULES.items():
        if module.startswith("bdiff.sampling"):
            bad = {t for t in imports(tree) if t.split(".")[0] in ("pyro", "lightning", "pytorch_lightning")}
            bad |= {t for t in imports(tree) if t.startswith(("bdiff.bayes", "bdiff.critic.net"))}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_no_import_cycle() -> None:
    known = set(MODULES)
    graph = {m: {t for t in imports(tree, import_time_only=True) if t in known and t != m} for m, tree in MODULES.items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_importing_the_layers_in_order_loads_nothing_above() -> None:
    script = f"""
import importlib, pkgutil, sys
import bdiff  # the package root's own light imports (schedule, denoiser) are not counted
root = set(sys.modules)
layers = {LAYERS[:-1]!r}
def above(i):
    return sorted(m for m in set(sys.modules) - root for p in (q for later in layers[i + 1:] for q in later)
                  if m == p or m.startswith(p + "."))
for i, prefixes in enumerate(layers):
    for p in prefixes:
        mod = importlib.import_module(p)
        for info in pkgutil.walk_packages(getattr(mod, "__path__", []), p + "."):
            importlib.import_module(info.name)
    assert not above(i), f"importing {{prefixes}} loaded {{above(i)}}"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_sampling_functions_are_short() -> None:
    """No function in bdiff/sampling is longer than 50 lines (a step is read in one screen)."""
    long = [f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for m, tree in MODULES.items()
            if m.startswith("bdiff.sampling") for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 50]
    assert long == []
