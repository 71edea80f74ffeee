"""Execute every notebook under notebooks/ in FAST mode on the session's tiny checkpoint.

Each notebook is a jupytext percent-format ``.py`` file. Papermill-style, a cell setting
``CKPT`` and ``FAST = True`` is injected right after the cell tagged ``parameters``
(``notebooks/execute.py``); the notebook then runs in a fresh ``python3`` kernel (nbclient)
from the repo root, with W&B off, the Agg backend and the feature cache in a temporary folder.
A notebook passes when no cell raises and at least one cell shows an image.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))

_spec = importlib.util.spec_from_file_location("notebook_execute", ROOT / "notebooks" / "execute.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)


def test_notebooks_exist_with_parameters_cell() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "01_weight_posterior.py",
        "02_uncertainty_through_the_reverse_process.py",
        "03_what_the_sampler_does.py",
        "04_ranking.py",
        "05_critic.py",
    ]
    for path in NOTEBOOKS:
        nb = jupytext.read(path)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
        assert "CKPT = " in tagged[0].source and "FAST = False" in tagged[0].source, path.name
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert first_code is tagged[0], f"{path.name}: the parameters cell must be the first code cell"


def test_inject_parameters_goes_after_the_tagged_cell() -> None:
    nb = runner.inject_parameters(jupytext.read(NOTEBOOKS[0]), CKPT="x.ckpt", FAST=True)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    assert nb.cells[index + 1].source == "CKPT = 'x.ckpt'\nFAST = True"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, last_ckpt: Path, tmp_path: Path) -> None:
    env = {"BDIFF_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
    nb = runner.execute(path, {"CKPT": str(last_ckpt), "FAST": True}, env=env, timeout=120)
    assert runner.image_outputs(nb) >= 1, f"{path.name} produced no image output"
