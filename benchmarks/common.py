"""What every benchmark shares: where the repository and its results are, how results are written, the references.

Run a benchmark as ``python benchmarks/<name>.py`` (from any folder, with bdiff installed): Python
puts ``benchmarks/`` on the path, so ``from common import ROOT, RESULTS, write_results`` and the
other benchmark modules (``peers``, ``timing``, ``heldout_baselines``) import as they are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the repository
RESULTS = ROOT / "benchmarks" / "results"  # every claim's numbers, cited by BENCHMARKS.md and docs/


def write_json(path: Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON (anything else as ``str``) to ``path``, creating its folder; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def write_results(out: Path, stem: str, payload: Any, rows: list[dict], columns: list[str]) -> None:
    """Write ``<stem>.json`` (payload) and ``<stem>.md`` (a table of rows) into ``out``; print the table."""
    from bdiff.metrics.report import markdown_table

    write_json(out / f"{stem}.json", payload)
    table = markdown_table(rows, columns)
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)


def references_for(spaces: Sequence[str] | None = None) -> dict[str, tuple[Any, Any]]:
    """:func:`bdiff.metrics.references.references_for` (every digits feature space by default), after training
    any digits classifier missing from the feature cache (:func:`bdiff.lit.feature_module.ensure_feature_nets`)."""
    from bdiff.lit.feature_module import ensure_feature_nets
    from bdiff.metrics.features import DIGITS_SPACES
    from bdiff.metrics.references import references_for as load_references

    spaces = DIGITS_SPACES if spaces is None else spaces
    ensure_feature_nets(spaces)
    return load_references(spaces)
