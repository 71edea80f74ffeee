"""``benchmarks/budgets_between.py --summarise``: the table that decides where ``--nfe N`` runs a shorter entry as it is."""

from __future__ import annotations

from tests.conftest import benchmark_module

budgets_between = benchmark_module("budgets_between")
CHOOSE_CELL, shorter_vs_stretched = budgets_between.CHOOSE_CELL, budgets_between.shorter_vs_stretched


def _row(cell: tuple[str, int], nfe: int, recipe: str, fd: tuple[float, float, float]) -> dict:
    return {"run": cell[0], "seed": cell[1], "nfe": nfe, "recipe": recipe,
            **{f"{space}/fd": v for space, v in zip(("digits", "digits_mlp", "pixels"), fd)}}


def test_the_shorter_entry_is_set_beside_itself_stretched() -> None:
    entry, rival = "unipc, fitted from T-1", "unipc bh1, leading"  # the 10-call entry, and a recipe that is not it there
    report = ("B", 0)
    rows = [_row(CHOOSE_CELL, 10, entry + " (the --nfe entry)", (1.0, 2.0, 0.03)),
            _row(CHOOSE_CELL, 12, entry, (2.0, 2.5, 0.04)),    # the shorter run wins everywhere: 0.5 / 0.8 / 0.75 *
            _row(CHOOSE_CELL, 13, entry, (2.0, 2.5, 0.02)),    # it loses in pixels: no star
            _row(report, 10, entry, (1.0, 1.0, 0.03)), _row(report, 12, entry, (0.5, 2.0, 0.03)),
            _row(CHOOSE_CELL, 10, rival, (9.0, 9.0, 0.9)), _row(CHOOSE_CELL, 12, rival, (1.0, 1.0, 0.01))]
    lines = shorter_vs_stretched(rows).splitlines()
    assert len(lines) == 4 and all(rival not in line for line in lines)  # only what --nfe runs at 10 is compared
    assert lines[2] == ("| 12 | 10 | unipc, fitted from T-1 | 0.500 / 0.800 / 0.750 * | 2.000-2.000 / 0.500-0.500 / "
                        "1.000-1.000 | 10 calls |")
    assert lines[3] == "| 13 | 10 | unipc, fitted from T-1 | 0.500 / 0.800 / 1.500 | not run | 13 calls |"
