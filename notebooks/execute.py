"""Execute the jupytext ``.py`` notebooks, papermill-style, into ``.ipynb`` files.

    python notebooks/execute.py --all
    python notebooks/execute.py notebooks/02_uncertainty_through_the_reverse_process.py \
        --ckpt runs/bdiff/<run id>/checkpoints/last.ckpt [--fast] --out /tmp/02.ipynb

``--all`` runs every ``notebooks/NN_*.py`` in full mode on the README's default run (the newest
finished ``python train.py`` run under ``runs/bdiff``, i.e. ``configs/digits.yaml``; ``--ckpt`` to
choose another) and writes each next to its ``.py`` as the paired ``.ipynb`` that is committed
(jupytext pairing ``ipynb,py:percent``, so ``jupytext --sync`` keeps them together). Notebook 5
gets a critic trained against that checkpoint (``--critic``; by default trained once into
``runs/critic/notebooks-<run id>`` and reused).

One notebook: a cell assigning the given parameters is injected right after the cell tagged
``parameters`` (only the names that cell assigns); the notebook runs in a fresh ``python3`` kernel
(this interpreter's ipykernel) from the repo root, with W&B off and the Agg backend. For the
committed notebooks the injected cell is removed again after the run (the values are kept in the
notebook metadata under ``bdiff.parameters``), so their cells are exactly the ``.py`` file's.
Needs the dev extras (jupytext, nbclient, nbformat, ipykernel). ``tests/test_notebooks.py`` uses
the same functions.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
DEFAULT_CONFIG = ROOT / "configs" / "digits.yaml"
PAIRING = "ipynb,py:percent"
INJECTED_TAG = "injected-parameters"


def notebook_paths() -> list[Path]:
    """The notebooks: ``notebooks/NN_*.py``, sorted."""
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))


def parameters_cell_index(nb: Any) -> int:
    """Index of the cell tagged ``parameters``; ``ValueError`` when there is none."""
    index = next(
        (i for i, cell in enumerate(nb.cells) if "parameters" in cell.get("metadata", {}).get("tags", [])), None
    )
    if index is None:
        raise ValueError("notebook has no cell tagged 'parameters'")
    return index


def parameter_names(nb: Any) -> list[str]:
    """Names the ``parameters`` cell assigns (``CKPT``, ``FAST``, ...), in order."""
    tree = ast.parse(nb.cells[parameters_cell_index(nb)].source)
    return [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)]


def inject_parameters(nb: Any, **params: object) -> Any:
    """Insert a code cell assigning ``params`` after the cell tagged ``parameters``; returns ``nb``."""
    import nbformat

    index = parameters_cell_index(nb)
    source = "\n".join(f"{name} = {value!r}" for name, value in params.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]}))
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
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=timeout, record_timing=False, resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute(env=full_env, cwd=str(ROOT))
    return nb


# -- the committed notebooks ---------------------------------------------------------------------
def relative_to_root(path: str | Path) -> str:
    """``path`` relative to the repo root when it lies inside it (the kernel runs there), else as given."""
    for candidate in (Path(path).absolute(), Path(path).resolve()):
        if candidate.is_relative_to(ROOT):
            return candidate.relative_to(ROOT).as_posix()
    return str(path)


def _is_subset(wanted: Any, have: Any) -> bool:
    """True when every leaf of ``wanted`` (nested dicts) has the same value in ``have``."""
    if isinstance(wanted, dict):
        return isinstance(have, dict) and all(k in have and _is_subset(v, have[k]) for k, v in wanted.items())
    return wanted == have


def is_default_run(run_dir: Path, default: dict | None = None) -> bool:
    """True when ``run_dir/config.yaml`` is ``python train.py``'s run: the same seed, model, data and
    ``trainer.max_steps`` as ``configs/digits.yaml``, and ``checkpoints/last.ckpt`` reached max_steps.
    ``default``: that config resolved (:func:`bdiff.lit.cli.resolved_config`; resolved here when None)."""
    import torch
    import yaml

    from bdiff.lit.cli import resolved_config

    try:
        # with the code defaults the YAML leaves out, as a run's config.yaml has them
        default = resolved_config(DEFAULT_CONFIG) if default is None else default
        run = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    wanted = {k: default[k] for k in ("seed_everything", "model", "data") if k in default}
    wanted["trainer"] = {"max_steps": default.get("trainer", {}).get("max_steps")}
    if not isinstance(run, dict) or not _is_subset(wanted, run):
        return False
    try:
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return int(ckpt.get("global_step", -1)) >= int(wanted["trainer"]["max_steps"] or 0)


def default_checkpoint(root: str | Path = ROOT / "runs" / "bdiff") -> Path:
    """``last.ckpt`` of the newest finished default run (:func:`is_default_run`) under ``root``."""
    from bdiff.lit.cli import resolved_config

    paths = sorted(Path(root).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    default = resolved_config(DEFAULT_CONFIG) if paths else {}
    for path in paths:
        if is_default_run(path.parents[1], default):
            return path
    raise FileNotFoundError(
        f"no finished run of configs/digits.yaml under {relative_to_root(root)!r} (looked at {len(paths)} "
        "runs): train one with `python train.py`, or pass --ckpt"
    )


def critic_for(ckpt: Path) -> Path:
    """A critic trained against ``ckpt`` (``configs/critic/digits.yaml``'s recipe), cached under
    ``runs/critic/notebooks-<run id>`` and reused on later calls."""
    out_dir = ROOT / "runs" / "critic" / f"notebooks-{ckpt.resolve().parents[1].name}"
    path = out_dir / "checkpoints" / "last.ckpt"
    if path.is_file() and path.stat().st_mtime >= ckpt.stat().st_mtime:
        return path
    from bdiff.lit.critic_module import cached_critic

    print(f"training a critic against {relative_to_root(ckpt)} into {relative_to_root(out_dir)} ...", flush=True)
    start = time.perf_counter()
    os.environ.setdefault("WANDB_MODE", "disabled")
    cached_critic(ckpt, out_dir, sampler=str(ROOT / "configs" / "sampler" / "dpmpp.yaml"))
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def _smaller_png(data: str) -> str:
    """A base64 PNG re-encoded losslessly: RGB when the alpha channel is opaque, zlib optimised."""
    import base64
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data)))
    if image.mode == "RGBA" and image.getchannel("A").getextrema() == (255, 255):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    smaller = base64.b64encode(buf.getvalue()).decode("ascii")
    return smaller if len(smaller) < len(data) else data


def tidy(nb: Any, params: dict[str, object], command: str, keep_stderr: bool = False) -> tuple[Any, list[str]]:
    """Make an executed notebook fit to commit; returns it and the stderr lines taken out of it.

    Drops the injected cell (``params`` and ``command`` are recorded in ``metadata.bdiff``) and,
    unless ``keep_stderr``, the kernel's stderr streams (Lightning banners, library warnings with
    machine paths); pairs the notebook with its ``.py``; gives cells stable ids; drops the
    interpreter version; replaces the repo root's absolute path in text outputs; re-encodes PNGs
    losslessly smaller.
    """
    nb.cells = [c for c in nb.cells if INJECTED_TAG not in c.get("metadata", {}).get("tags", [])]
    nb.metadata["bdiff"] = {"parameters": params, "command": command}
    nb.metadata.setdefault("jupytext", {})["formats"] = PAIRING
    nb.metadata.get("language_info", {}).pop("version", None)
    root = re.compile(re.escape(str(ROOT)) + r"/?")
    home = re.compile(re.escape(str(Path.home())) + r"/")
    stderr: list[str] = []
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
        if not keep_stderr:
            stderr += [line for out in cell.get("outputs", []) if out.get("name") == "stderr"
                       for line in out["text"].splitlines()]
            cell["outputs"] = [out for out in cell.get("outputs", []) if out.get("name") != "stderr"]
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = home.sub("~/", root.sub("", out["text"]))
            for mime, value in out.get("data", {}).items():
                if mime.startswith("text/") and isinstance(value, str):
                    out["data"][mime] = home.sub("~/", root.sub("", value))
                elif mime == "image/png":
                    out["data"][mime] = _smaller_png(value)
    return nb, stderr


def run_all(ckpt: str | None, critic: str | None, timeout: int, keep_stderr: bool = False) -> None:
    """Execute every notebook in full mode and write ``notebooks/NN_*.ipynb`` beside each ``.py``."""
    import jupytext

    ckpt_path = Path(ckpt) if ckpt else default_checkpoint()
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt_path)!r} does not exist")
    print(f"checkpoint: {relative_to_root(ckpt_path)}", flush=True)
    command = "python notebooks/execute.py --all" + (f" --ckpt {relative_to_root(ckpt_path)}" if ckpt else "")
    critic_path: Path | None = Path(critic) if critic else None
    total = time.perf_counter()
    for path in notebook_paths():
        names = parameter_names(jupytext.read(path))
        params: dict[str, object] = {"CKPT": relative_to_root(ckpt_path), "FAST": False}
        if "CRITIC" in names:
            critic_path = critic_path or critic_for(ckpt_path)
            params["CRITIC"] = relative_to_root(critic_path)
        params = {k: v for k, v in params.items() if k in names}
        start = time.perf_counter()
        print(f"{relative_to_root(path)} ...", flush=True)
        nb = execute(path, params, timeout=timeout)
        out = path.with_suffix(".ipynb")
        nb, stderr = tidy(nb, params, command, keep_stderr=keep_stderr)
        jupytext.write(nb, out, fmt="ipynb")
        if stderr:
            unique = list(dict.fromkeys(stderr))
            print(f"  the kernel's stderr, left out of the notebook ({len(stderr)} lines, {len(unique)} distinct):")
            print("\n".join(f"  | {line}" for line in unique), flush=True)
        print(f"  wrote {relative_to_root(out)} ({image_outputs(nb)} figures, "
              f"{out.stat().st_size / 1e3:.0f} kB) in {time.perf_counter() - start:.0f} s", flush=True)
    print(f"all notebooks in {time.perf_counter() - total:.0f} s; `jupytext --sync notebooks/*.py` is a no-op")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebook", nargs="?", help="a notebooks/NN_*.py file (or --all)")
    p.add_argument("--all", action="store_true",
                   help="run every notebook in full mode and write the committed notebooks/NN_*.ipynb")
    p.add_argument("--ckpt", default=None,
                   help="checkpoint (default with --all: the newest finished `python train.py` run under runs/bdiff; "
                        "otherwise the notebook's own default, the newest Bayesian runs/bdiff/*/checkpoints/last.ckpt)")
    p.add_argument("--critic", default=None,
                   help="critic checkpoint for notebooks with a CRITIC parameter (default with --all: one trained "
                        "against --ckpt into runs/critic/notebooks-<run id>, reused; otherwise the notebook's default)")
    p.add_argument("--fast", action="store_true", help="small mode (few samples and steps); not with --all")
    p.add_argument("--timeout", type=int, default=1800, help="seconds one cell may run (default 1800)")
    p.add_argument("--keep-stderr", action="store_true",
                   help="with --all: keep the kernel's stderr (warnings, Lightning banners) in the notebooks")
    p.add_argument("--out", default=None, help="where to write the executed .ipynb (one notebook; keep it out of the repo)")
    args = p.parse_args(argv)
    if args.all:
        if args.notebook or args.out or args.fast:
            p.error("--all writes notebooks/NN_*.ipynb in full mode: give no notebook, --out or --fast with it")
        run_all(args.ckpt, args.critic, args.timeout, keep_stderr=args.keep_stderr)
        return
    if not args.notebook or not args.out:
        p.error("give a notebook and --out, or --all")
    import jupytext

    names = parameter_names(jupytext.read(args.notebook))
    params: dict[str, object] = {"CKPT": args.ckpt, "FAST": args.fast}
    if args.critic is not None:
        params["CRITIC"] = args.critic
    params = {k: v for k, v in params.items() if k in names}
    nb = None
    try:
        nb = execute(args.notebook, params, timeout=args.timeout)
    finally:
        if nb is not None:
            import nbformat

            nbformat.write(nb, args.out)
            print(f"wrote {args.out} ({image_outputs(nb)} figures)")


if __name__ == "__main__":
    sys.exit(main())
