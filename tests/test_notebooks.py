"""Execute every notebook under notebooks/ in FAST mode on the session's tiny checkpoint.

Each notebook is a jupytext percent-format ``.py`` file. Papermill-style, a cell setting
``CKPT`` and ``FAST = True`` is injected right after the cell tagged ``parameters``; the
notebook then runs in a fresh ``python3`` kernel (nbclient) from the repo root, with W&B off,
the Agg backend and the feature cache in a temporary folder. A notebook passes when no cell
raises and at least one cell shows an image.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def inject_parameters(nb, **params: object):
    """Insert a code cell assigning ``params`` after the cell tagged ``parameters`` (papermill-style)."""
    index = next(
        (i for i, cell in enumerate(nb.cells) if "parameters" in cell.get("metadata", {}).get("tags", [])), None
    )
    if index is None:
        raise ValueError("notebook has no cell tagged 'parameters'")
    source = "\n".join(f"{name} = {value!r}" for name, value in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


def image_outputs(nb) -> int:
    """Number of outputs across code cells that carry a PNG/SVG image."""
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if {"image/png", "image/svg+xml"} & set(out.get("data", {}))
    )


def test_notebooks_exist() -> None:
    names = [p.name for p in NOTEBOOKS]
    assert len(names) == 4, names
    for path in NOTEBOOKS:
        nb = jupytext.read(path)
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), f"{path.name}: no parameters cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, last_ckpt: Path, tmp_path: Path) -> None:
    nb = inject_parameters(jupytext.read(path), CKPT=str(last_ckpt), FAST=True)
    env = dict(os.environ)
    env.update(
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        MPLBACKEND="Agg",
        BDIFF_CACHE=str(tmp_path / "cache"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        OMP_NUM_THREADS="2",
    )
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=120,
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute(env=env, cwd=str(ROOT))
    assert image_outputs(nb) >= 1, f"{path.name} produced no image output"
