"""Execute every notebook under notebooks/ in FAST mode on the session's tiny checkpoint.

Each notebook is a jupytext percent-format ``.py`` file. Papermill-style, a cell setting
``CKPT`` and ``FAST = True`` is injected right after the cell tagged ``parameters``
(``notebooks/execute.py``); the notebook then runs in a fresh ``python3`` kernel (nbclient)
from the repo root, with W&B off, the Agg backend and the feature cache in a temporary folder.
A notebook passes when no cell raises and at least one cell shows an image.

Each notebook is also committed executed, as the ``.ipynb`` paired with its ``.py``
(``python notebooks/execute.py --all``): it must hold the same cells as the ``.py`` (sources,
outputs excluded), have run in full mode without an error, and show at least one figure.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
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
    # generous per-cell limit: notebook 04 may train the digits feature net (a subprocess) on a busy CPU
    nb = runner.execute(path, {"CKPT": str(last_ckpt), "FAST": True}, env=env, timeout=400)
    assert runner.image_outputs(nb) >= 1, f"{path.name} produced no image output"


def _cells(nb) -> list[tuple[str, str]]:
    """(cell type, source) of every cell but an injected-parameters one."""
    return [(c.cell_type, c.source) for c in nb.cells if runner.INJECTED_TAG not in c.metadata.get("tags", [])]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_ipynb_matches_its_py(path: Path) -> None:
    ipynb = path.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{ipynb.name} is missing: run `python notebooks/execute.py --all`"
    text, executed = jupytext.read(path), nbformat.read(ipynb, as_version=4)
    assert text.metadata.get("jupytext", {}).get("formats") == runner.PAIRING, f"{path.name}: not paired"
    assert executed.metadata.get("jupytext", {}).get("formats") == runner.PAIRING, f"{ipynb.name}: not paired"
    assert _cells(executed) == _cells(text), (
        f"{ipynb.name} and {path.name} differ: `jupytext --sync {path.relative_to(ROOT)}` after editing the "
        "notebook, then `python notebooks/execute.py --all`"
    )
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"{ipynb.name}: not every code cell was run"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], f"{ipynb.name}: a cell raised"
    assert executed.metadata.get("bdiff", {}).get("parameters", {}).get("FAST") is False, f"{ipynb.name}: not full mode"
    assert runner.image_outputs(executed) >= 1, f"{ipynb.name} has no figure"


def test_tidy_drops_the_injected_cell_and_records_parameters() -> None:
    original = jupytext.read(NOTEBOOKS[0])
    nb = runner.inject_parameters(jupytext.read(NOTEBOOKS[0]), CKPT="runs/x.ckpt", FAST=False)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="GPU available: False\n"),
        nbformat.v4.new_output("stream", name="stdout", text=f"checkpoint: {ROOT}/runs/x.ckpt\n"),
    ]
    tidied, stderr = runner.tidy(nb, {"CKPT": "runs/x.ckpt", "FAST": False}, "python notebooks/execute.py --all")
    assert _cells(tidied) == _cells(original) and len(tidied.cells) == len(original.cells)
    assert tidied.metadata["bdiff"]["parameters"] == {"CKPT": "runs/x.ckpt", "FAST": False}
    assert tidied.metadata["jupytext"]["formats"] == runner.PAIRING
    assert stderr == ["GPU available: False"]
    assert [o.text for o in next(c for c in tidied.cells if c.cell_type == "code").outputs] == ["checkpoint: runs/x.ckpt\n"]


def test_default_checkpoint_is_the_newest_finished_default_run(tmp_path: Path) -> None:
    import os

    import torch
    import yaml

    from bdiff.lit.cli import resolved_config

    default = resolved_config(ROOT / "configs" / "digits.yaml")  # what a run's config.yaml holds
    max_steps = default["trainer"]["max_steps"]

    def run(name: str, step: int, mtime: int, **changes: object) -> Path:
        config = {**default, **changes}
        ckpt = tmp_path / name / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(config))
        torch.save({"global_step": step}, ckpt)
        os.utime(ckpt, (mtime, mtime))
        return ckpt

    chosen = run("finished", max_steps, 1000)
    run("older", max_steps, 500)
    run("unfinished", max_steps // 2, 2000)
    run("other_seed", max_steps, 3000, seed_everything=default["seed_everything"] + 1)
    run("other_model", max_steps, 4000, model={**default["model"], "lr": 0.5})
    assert runner.default_checkpoint(tmp_path) == chosen
    shutil.rmtree(tmp_path / "finished")
    shutil.rmtree(tmp_path / "older")
    with pytest.raises(FileNotFoundError, match="python train.py"):
        runner.default_checkpoint(tmp_path)
