"""The samples file shared by sampler, evaluator and notebooks: ``samples.npz``.

Keys (all plain arrays, so the file loads with ``np.load(path, allow_pickle=False)``):

==========  ===============  =====================================================
key         dtype / shape    meaning
==========  ===============  =====================================================
images      float32 (N,C,H,W)  final images on the [0, 1] scale
variance    float32 (N,C,H,W)  optional; per-pixel variance of the final image on
                               the same [0, 1] scale (a variance ``v`` of x in
                               [-1, 1] is ``v / 4`` for the image ``(x + 1) / 2``).
                               Absent for samplers without uncertainty.
nfe         float64 ()         sequential denoiser calls per sample (mean if adaptive)
seconds     float64 ()         wall time of the whole sampling run
config      str ()             JSON object of the sampler settings
==========  ===============  =====================================================

Example::

    >>> import tempfile, torch
    >>> s = SampleSet(torch.rand(2, 1, 4, 4), None, nfe=50.0, seconds=1.5, config={"sampler": "ddim"})
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_samples(f"{d}/run/samples.npz", s)
    ...     load_samples(f"{d}/run/samples.npz").config
    {'sampler': 'ddim'}
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["SampleSet", "save_samples", "load_samples"]

RANGE_TOL = 1e-6  # float32 rounding slack for "in [0, 1]" and "variance >= 0"
_REQUIRED = ("images", "nfe", "seconds", "config")


@dataclass
class SampleSet:
    """Images from one sampling run, their optional per-pixel variance and the run's cost.

    Attributes:
        images: (N,C,H,W) float32 in [0, 1].
        variance: (N,C,H,W) float32 >= 0 on the [0, 1] image scale, or None.
        nfe: sequential denoiser calls per sample (mean over samples if adaptive), > 0.
        seconds: wall time of the sampling run, >= 0.
        config: sampler settings; must be JSON-serialisable.
    """

    images: Tensor
    variance: Tensor | None
    nfe: float
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)


def _as_float32(name: str, x: Tensor) -> np.ndarray:
    if not isinstance(x, Tensor):
        raise ValueError(f"SampleSet.{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"SampleSet.{name} has dtype {x.dtype}; expected a float tensor on the [0, 1] scale "
            "(for uint8 images use images.float() / 255)"
        )
    return x.detach().to("cpu", torch.float32).numpy()


def _check_arrays(arrays: dict[str, np.ndarray], where: str) -> None:
    """Raise ValueError naming the key and the problem if ``arrays`` is not a valid samples file."""
    missing = [k for k in _REQUIRED if k not in arrays]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; a samples file needs {list(_REQUIRED)}")
    images = arrays["images"]
    for key in ("images", "variance"):
        if key not in arrays:
            continue
        a = arrays[key]
        if a.ndim != 4:
            raise ValueError(f"{where}: '{key}' must have shape (N,C,H,W), got shape {a.shape}")
        if a.dtype != np.float32:
            raise ValueError(f"{where}: '{key}' must be float32, got {a.dtype}")
        if a.shape[0] == 0:
            raise ValueError(f"{where}: '{key}' holds no samples (N=0)")
        if not np.isfinite(a).all():
            raise ValueError(f"{where}: '{key}' contains NaN or inf")
    if images.min() < -RANGE_TOL or images.max() > 1 + RANGE_TOL:
        raise ValueError(
            f"{where}: 'images' values lie in [{images.min():.4g}, {images.max():.4g}], outside [0, 1]; "
            "map [-1, 1] model outputs with (x + 1) / 2 and clamp"
        )
    if "variance" in arrays:
        var = arrays["variance"]
        if var.shape != images.shape:
            raise ValueError(f"{where}: 'variance' shape {var.shape} differs from 'images' shape {images.shape}")
        if var.min() < -RANGE_TOL:
            raise ValueError(f"{where}: 'variance' has negative values (min {var.min():.4g})")
    for key, lower, strict in (("nfe", 0.0, True), ("seconds", 0.0, False)):
        a = arrays[key]
        if a.shape != () or a.dtype.kind not in "fiu":
            raise ValueError(f"{where}: '{key}' must be a numeric scalar, got dtype {a.dtype} shape {a.shape}")
        value = float(a)
        if not np.isfinite(value) or value < lower or (strict and value == lower):
            raise ValueError(f"{where}: '{key}' must be finite and {'>' if strict else '>='} {lower}, got {value}")
    config = arrays["config"]
    if config.shape != () or config.dtype.kind != "U":
        raise ValueError(f"{where}: 'config' must be a JSON string, got dtype {config.dtype} shape {config.shape}")
    try:
        parsed = json.loads(str(config))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: 'config' is not valid JSON ({e})") from e
    if not isinstance(parsed, dict):
        raise ValueError(f"{where}: 'config' must be a JSON object, got {type(parsed).__name__}")


def save_samples(path: str | os.PathLike[str], sample_set: SampleSet) -> None:
    """Validate ``sample_set`` and write it to ``path`` atomically (temp file + ``os.replace``).

    Parent folders are created. Float tensors of any precision are stored as float32.
    Raises ValueError (naming the key) for anything ``load_samples`` would reject, so a bad
    file is never written.
    """
    path = Path(path)
    try:
        config_json = json.dumps(sample_set.config, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"SampleSet.config is not JSON-serialisable ({e}); store plain numbers/strings") from e
    arrays = {
        "images": _as_float32("images", sample_set.images),
        "nfe": np.asarray(sample_set.nfe, dtype=np.float64),
        "seconds": np.asarray(sample_set.seconds, dtype=np.float64),
        "config": np.asarray(config_json),
    }
    if sample_set.variance is not None:
        arrays["variance"] = _as_float32("variance", sample_set.variance)
    _check_arrays(arrays, f"save_samples({path})")

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # a file object, so numpy does not append ".npz" to the name
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_samples(path: str | os.PathLike[str]) -> SampleSet:
    """Load and validate a samples file written by :func:`save_samples`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not an ``.npz`` archive, or a key is missing, has the wrong
            shape/dtype, holds NaN/inf or values out of range (the message names the key).
    Keys other than the documented ones are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path} is not a readable samples .npz archive ({type(e).__name__}: {e})") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy file loads as one ndarray
        raise ValueError(f"{path} is a single .npy array, not a samples .npz archive; write it with save_samples")
    with loaded as npz:
        try:
            arrays = {k: npz[k] for k in npz.files}
        except ValueError as e:  # object arrays need pickle, which we refuse
            raise ValueError(f"{path}: a key holds a pickled object array ({e}); store plain arrays") from e
    _check_arrays(arrays, str(path))
    return SampleSet(
        images=torch.from_numpy(arrays["images"]),
        variance=torch.from_numpy(arrays["variance"]) if "variance" in arrays else None,
        nfe=float(arrays["nfe"]),
        seconds=float(arrays["seconds"]),
        config=json.loads(str(arrays["config"])),
    )
