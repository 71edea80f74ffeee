"""Execute a notebook stored as a jupytext ``.py`` file, papermill-style, into an ``.ipynb``.

    python notebooks/execute.py notebooks/02_uncertainty_through_the_reverse_process.py \
        --ckpt runs/bdiff/<run id>/checkpoints/last.ckpt [--fast] --out /tmp/02.ipynb

A cell assigning the given parameters is injected right after the cell tagged ``parameters``;
the notebook runs in a fresh ``python3`` kernel (this interpreter's ipykernel) from the repo
root, with W&B off and the Agg backend. Needs the dev extras (jupytext, nbclient, nbformat,
ipykernel). ``tests/test_notebooks.py`` uses the same functions.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def inject_parameters(nb: Any, **params: object) -> Any:
    """Insert a code cell assigning ``params`` after the cell tagged ``parameters``; returns ``nb``."""
    import nbformat

    index = next(
        (i for i, cell in enumerate(nb.cells) if "parameters" in cell.get("metadata", {}).get("tags", [])), None
    )
    if index is None:
        raise ValueError("notebook has no cell tagged 'parameters'")
    source = "\n".join(f"{name} = {value!r}" for name, value in params.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


def image_outputs(nb: Any) -> int:
    """Number of outputs across code cells that carry a PNG/SVG image."""
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if {"image/png", "image/svg+xml"} & set(out.get("data", {}))
    )


def execute(path: str | Path, params: dict[str, object], env: dict[str, str] | None = None, timeout: int = 600) -> Any:
    """Read ``path`` (jupytext), inject ``params``, run it from the repo root; returns the executed notebook.

    Raises ``nbclient.exceptions.CellExecutionError`` naming the failing cell.
    """
    import jupytext
    import nbclient

    nb = inject_parameters(jupytext.read(path), **params) if params else jupytext.read(path)
    full_env = dict(os.environ)
    full_env.update(WANDB_MODE="disabled", WANDB_SILENT="true", MPLBACKEND="Agg")
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    full_env.update(env or {})
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(ROOT)}})
    client.execute(env=full_env, cwd=str(ROOT))
    return nb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebook", help="a notebooks/NN_*.py file")
    p.add_argument("--ckpt", default=None, help="checkpoint (default: the newest Bayesian runs/bdiff/*/checkpoints/last.ckpt)")
    p.add_argument("--fast", action="store_true", help="small mode (few samples and steps)")
    p.add_argument("--out", required=True, help="where to write the executed .ipynb (keep it out of the repo)")
    args = p.parse_args()
    params: dict[str, object] = {"CKPT": args.ckpt, "FAST": args.fast}
    nb = None
    try:
        nb = execute(args.notebook, params)
    finally:
        if nb is not None:
            import nbformat

            nbformat.write(nb, args.out)
            print(f"wrote {args.out} ({image_outputs(nb)} figures)")


if __name__ == "__main__":
    main()
