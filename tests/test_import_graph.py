"""bdiff's import graph has no cycle: every ``import bdiff.x`` / ``from bdiff.x import y`` in every module counts,
the ones inside functions and under ``if __name__ == "__main__"`` included.

The graph comes from the same parse as tests/test_layers.py (:data:`~tests.test_layers.MODULES`,
:func:`~tests.test_layers.imports`): one node per module under bdiff/, one edge per import of another
bdiff module. A cycle is reported as the modules along it, ``a -> b -> a``.
"""

from __future__ import annotations

from tests.test_layers import MODULES, imports


def import_graph() -> dict[str, set[str]]:
    """{module: the bdiff modules it imports anywhere in its code}."""
    known = set(MODULES)
    return {m: {t for t in imports(tree) if t in known and t != m} for m, tree in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A cycle (its modules, the first repeated at the end) for each back edge a depth-first walk meets; [] if none."""
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for nxt in sorted(graph[module]):
            if nxt in path:
                cycle = path[path.index(nxt):] + [nxt]
                if not any(set(cycle) <= set(c) for c in found):
                    found.append(cycle)
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return found


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = import_graph()
    assert "bdiff.lit.feature_module" in graph["bdiff.evaluate"]  # imported in main() only


def test_cycles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_bdiff_has_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)
