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
score       float32 (N,)     optional; the per-sample uncertainty score in [0, 1]
                               (:func:`bdiff.metrics.usefulness.sample_score`: the
                               sample's rank among its look-alikes, 1 = least
                               certain). Written by ``bdiff.sample`` with variance.
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

import contextlib
import json
import numbers
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from bdiff.checks import as_integer
from bdiff.files import atomic_file

__all__ = ["SampleSet", "SamplesWriter", "save_samples", "load_samples"]

RANGE_TOL = 1e-6  # float32 rounding slack for "in [0, 1]" and "variance >= 0"
_REQUIRED = ("images", "nfe", "seconds", "config")
_COPY_BLOCK = 1 << 20  # bytes per copy when SamplesWriter assembles the archive


@dataclass
class SampleSet:
    """Images from one sampling run, their optional per-pixel variance and the run's cost.

    Attributes:
        images: (N,C,H,W) float32 in [0, 1].
        variance: (N,C,H,W) float32 >= 0 on the [0, 1] image scale, or None.
        nfe: sequential denoiser calls per sample (mean over samples if adaptive), > 0.
        seconds: wall time of the sampling run, >= 0.
        config: sampler settings; must be JSON-serialisable.
        score: (N,) float32 in [0, 1], the per-sample uncertainty score, or None.
    """

    images: Tensor
    variance: Tensor | None
    nfe: float
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    score: Tensor | None = None


def _as_float32(name: str, x: Tensor) -> np.ndarray:
    if not isinstance(x, Tensor):
        raise ValueError(f"SampleSet.{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"SampleSet.{name} has dtype {x.dtype}; expected a float tensor on the [0, 1] scale "
            "(for uint8 images use images.float() / 255)"
        )
    return x.detach().to("cpu", torch.float32).numpy()


def _check_image_array(key: str, a: np.ndarray, where: str) -> None:
    """Raise ValueError naming ``key`` unless ``a`` is a valid (N,C,H,W) 'images' or 'variance' array."""
    if a.ndim != 4:
        raise ValueError(f"{where}: '{key}' must have shape (N,C,H,W), got shape {a.shape}")
    if a.dtype != np.float32:
        raise ValueError(f"{where}: '{key}' must be float32, got {a.dtype}")
    if a.shape[0] == 0:
        raise ValueError(f"{where}: '{key}' holds no samples (N=0)")
    if a.size == 0:
        raise ValueError(f"{where}: '{key}' has an empty image shape {a.shape[1:]}")
    if not np.isfinite(a).all():
        raise ValueError(f"{where}: '{key}' contains NaN or inf")
    if key == "images" and (a.min() < -RANGE_TOL or a.max() > 1 + RANGE_TOL):
        raise ValueError(
            f"{where}: 'images' values lie in [{a.min():.4g}, {a.max():.4g}], outside [0, 1]; "
            "map [-1, 1] model outputs with (x + 1) / 2 and clamp"
        )
    if key == "variance" and a.min() < -RANGE_TOL:
        raise ValueError(f"{where}: 'variance' has negative values (min {a.min():.4g})")


def _check_scalars(arrays: dict[str, np.ndarray], where: str) -> None:
    """Raise ValueError naming the key unless 'nfe', 'seconds' and 'config' are valid."""
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


def _check_arrays(arrays: dict[str, np.ndarray], where: str) -> None:
    """Raise ValueError naming the key and the problem if ``arrays`` is not a valid samples file."""
    missing = [k for k in _REQUIRED if k not in arrays]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; a samples file needs {list(_REQUIRED)}")
    for key in ("images", "variance"):
        if key in arrays:
            _check_image_array(key, arrays[key], where)
    if "variance" in arrays and arrays["variance"].shape != arrays["images"].shape:
        raise ValueError(
            f"{where}: 'variance' shape {arrays['variance'].shape} differs from 'images' shape {arrays['images'].shape}"
        )
    if "score" in arrays:
        score = arrays["score"]
        if score.shape != arrays["images"].shape[:1] or score.dtype != np.float32 or not np.isfinite(score).all():
            raise ValueError(f"{where}: 'score' must be finite float32 of shape (N,) = {arrays['images'].shape[:1]}, "
                             f"got {score.dtype} {score.shape}")
    _check_scalars(arrays, where)


def _scalar_arrays(nfe: float, seconds: float, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """The small keys of a samples file; ValueError names a value of the wrong type."""
    for key, value in (("nfe", nfe), ("seconds", seconds)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"SampleSet.{key} must be a real number, got {type(value).__name__} {value!r}")
    if not isinstance(config, dict):
        raise ValueError(f"SampleSet.config must be a dict, got {type(config).__name__}")
    try:
        config_json = json.dumps(config, sort_keys=True)
    except (TypeError, ValueError) as e:  # ValueError: a circular reference
        raise ValueError(f"SampleSet.config is not JSON-serialisable ({e}); store plain numbers/strings") from e
    return {
        "nfe": np.asarray(nfe, dtype=np.float64),
        "seconds": np.asarray(seconds, dtype=np.float64),
        "config": np.asarray(config_json),
    }


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file object that becomes ``path`` (parents created) only if the block succeeds."""
    if path.is_dir():
        raise ValueError(f"samples file {str(path)!r} is a directory; give a file name such as samples.npz")
    with atomic_file(path) as f:  # a file object, so numpy does not append ".npz" to the name
        yield f


def save_samples(path: str | os.PathLike[str], sample_set: SampleSet) -> None:
    """Validate ``sample_set`` and write it to ``path`` atomically (temp file + ``os.replace``).

    Parent folders are created. Float tensors of any precision are stored as float32.
    Raises ValueError (naming the key) for anything ``load_samples`` would reject, so a bad
    file is never written. For runs too large to hold in memory use :class:`SamplesWriter`.
    """
    path = Path(path)
    arrays = {"images": _as_float32("images", sample_set.images),
              **_scalar_arrays(sample_set.nfe, sample_set.seconds, sample_set.config)}
    if sample_set.variance is not None:
        arrays["variance"] = _as_float32("variance", sample_set.variance)
    if sample_set.score is not None:
        arrays["score"] = _as_float32("score", sample_set.score)
    _check_arrays(arrays, f"save_samples({path})")
    with _atomic_file(path) as f:
        np.savez(f, **arrays)


class SamplesWriter:
    """Write a samples file chunk by chunk, holding at most one chunk in memory.

    Each chunk is validated when it arrives (the checks of :func:`save_samples`, so a NaN
    stops the run at the chunk that has it) and appended to a temporary ``.npy`` file next
    to ``path``; :meth:`finish` streams those into the ``.npz`` archive -- the same file
    :func:`save_samples` writes, loadable by :func:`load_samples` -- and moves it into place
    atomically. On an error, or when the ``with`` block is left without :meth:`finish`,
    the temporary files are removed and an earlier file at ``path`` is left untouched.

    Args:
        path: the samples file to write.
        n: number of samples N the file will hold.
        image_shape: (C, H, W) of every sample.
        with_variance: whether chunks come with a per-pixel variance.

    Example::

        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d, SamplesWriter(f"{d}/s.npz", 4, (1, 2, 2), False) as w:
        ...     for _ in range(2):
        ...         w.write(torch.rand(2, 1, 2, 2))
        ...     w.finish(nfe=10.0, seconds=0.5, config={"sampler": "ddim"})
        ...     load_samples(f"{d}/s.npz").images.shape
        torch.Size([4, 1, 2, 2])
    """

    def __init__(self, path: str | os.PathLike[str], n: int, image_shape: Sequence[int], with_variance: bool) -> None:
        as_integer("SamplesWriter: n", n, 1)
        shape = tuple(image_shape)
        if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
            raise ValueError(f"SamplesWriter: image_shape must be (C, H, W) of positive integers, got {image_shape!r}")
        self.path, self.n, self.image_shape, self.with_variance = Path(path), n, shape, with_variance
        if self.path.is_dir():
            raise ValueError(f"samples file {str(self.path)!r} is a directory; give a file name such as samples.npz")
        self.written = 0
        self._parts: dict[str, tuple[Path, BinaryIO]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            for key in ("images", "variance") if with_variance else ("images",):
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.{key}.", suffix=".npy")
                f = os.fdopen(fd, "w+b")
                self._parts[key] = (Path(tmp), f)
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                          "shape": (n, *shape)}
                np.lib.format.write_array_header_1_0(f, header)
        except BaseException:
            self.abort()
            raise

    def write(self, images: Tensor, variance: Tensor | None = None) -> None:
        """Append a chunk: images (B,C,H,W) on the [0, 1] scale, variance the same shape (or None)."""
        if not self._parts:
            raise ValueError(f"SamplesWriter({self.path}) is closed")
        if (variance is not None) != self.with_variance:
            raise ValueError(f"SamplesWriter({self.path}): this file {'needs' if self.with_variance else 'has no'} 'variance'")
        chunk = {"images": _as_float32("images", images)}
        if variance is not None:
            chunk["variance"] = _as_float32("variance", variance)
        lo, hi = self.written, self.written + len(chunk["images"])
        where = f"SamplesWriter({self.path}) samples {lo}..{hi - 1}"
        for key, a in chunk.items():
            _check_image_array(key, a, where)
            if a.shape[1:] != self.image_shape:
                raise ValueError(f"{where}: '{key}' has image shape {a.shape[1:]}, expected {self.image_shape}")
            if a.shape[0] != hi - lo:
                raise ValueError(f"{where}: 'variance' holds {a.shape[0]} samples, 'images' {hi - lo}")
        if hi > self.n:
            raise ValueError(f"{where}: more than the n={self.n} samples this file was opened for")
        for key, a in chunk.items():
            self._parts[key][1].write(np.ascontiguousarray(a).data)
        self.written = hi

    def finish(self, nfe: float, seconds: float, config: dict[str, Any]) -> None:
        """Check all N samples arrived, then assemble the ``.npz`` and move it to ``path`` atomically."""
        if not self._parts:
            raise ValueError(f"SamplesWriter({self.path}) is closed")
        where = f"SamplesWriter({self.path})"
        if self.written != self.n:
            raise ValueError(f"{where}: only {self.written} of n={self.n} samples were written")
        small = _scalar_arrays(nfe, seconds, config)
        _check_scalars(small, where)
        try:
            with _atomic_file(self.path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for key, (_, part) in self._parts.items():
                    part.flush()
                    part.seek(0)
                    with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                        shutil.copyfileobj(part, member, _COPY_BLOCK)
                for key, a in small.items():
                    with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, a, allow_pickle=False)
        finally:
            self.abort()

    def abort(self) -> None:
        """Remove the temporary files (idempotent); ``path`` is left as it was."""
        for tmp, f in self._parts.values():
            f.close()
            tmp.unlink(missing_ok=True)
        self._parts = {}

    def __enter__(self) -> SamplesWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


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
        score=torch.from_numpy(arrays["score"]) if "score" in arrays else None,
    )
