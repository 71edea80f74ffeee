"""Where bdiff keeps what it computes once and reuses: ``$BDIFF_CACHE`` if set, else ``~/.cache/bdiff``.

Below it: ``features/`` (feature networks of the evaluator, :mod:`bdiff.metrics.features`) and
``fitted_grids/`` (timestep grids fitted to checkpoints, :mod:`bdiff.sampling.fitted_grid`).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$BDIFF_CACHE`` (``~`` expanded) if the variable is set and not empty, else ``~/.cache/bdiff``."""
    root = os.environ.get("BDIFF_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "bdiff"
