"""The layers of DESIGN.md: imports point one way, down the list.

Statically, every ``bdiff`` import in every module (function-level ones included) goes to its own
layer or a lower one; ``bdiff/sampling`` and ``bdiff/sampler_callbacks`` import neither Pyro nor Lightning (tests/test_import_graph.py
checks the same imports for cycles). At run time, a fresh interpreter imports the layers in order (every
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
    # argument checks; the cache folder; atomic writes; the schedule maths; the commands' one-line errors; the digits
    ("bdiff.checks", "bdiff.cache", "bdiff.files", "bdiff.schedule", "bdiff.console", "bdiff.datasets"),
    ("bdiff.nets", "bdiff.denoiser", "bdiff.gaussian_denoiser", "bdiff.critic"),  # networks, the Denoiser seam, the Wiener filter
    ("bdiff.bayes", "bdiff.checkpoint"),  # Pyro; a checkpoint builds a Bayesian denoiser
    ("bdiff.sampling", "bdiff.sampler_callbacks"),  # the sampler core and its opt-in callbacks
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


def imports(tree: ast.AST) -> set[str]:
    """Names imported anywhere in ``tree`` (inside functions too): ``import a.b`` gives ``a.b``; ``from a import b``
    gives ``a`` and ``a.b`` (``b`` may be a submodule)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # ``from bdiff.x import submodule``
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
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


SAMPLING = ("bdiff.sampling", "bdiff.sampler_callbacks")


def test_sampling_knows_neither_pyro_nor_lightning() -> None:
    for module, tree in MODULES.items():
        if module.startswith(SAMPLING):
            bad = {t for t in imports(tree) if t.split(".")[0] in ("pyro", "lightning", "pytorch_lightning")}
            bad |= {t for t in imports(tree) if t.startswith(("bdiff.bayes", "bdiff.critic.net"))}
            assert not bad, f"{module} imports {sorted(bad)}"


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
    """No function in bdiff/sampling or bdiff/sampler_callbacks is longer than 40 lines (read in one screen)."""
    long = [f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for m, tree in MODULES.items()
            if m.startswith(SAMPLING) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 40]
    assert long == []
