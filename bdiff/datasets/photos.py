"""32x32 crops of the photographs bundled inside scikit-image, written as an ImageFolder tree.

    pip install -e ".[photos]"           # scikit-image: the photos load from the installed package
    python -m bdiff.datasets.photos data/photos [--crops-per-photo 500] [--size 32] [--seed 0]

writes ``data/photos/<photo>/<index>.png``: one class folder per photo, RGB PNGs of ``size`` x
``size`` pixels. It is the layout a user's own photos take, so training on it goes through
exactly their path (``--data bdiff.lit.data.ImageFolderDataModule``, ``configs/photos32.yaml``).

How a crop is made (one seeded NumPy generator for the whole tree, so a seed gives the same files):

1. a scale is drawn so that the photo's shorter side would be a random length in
   ``[MIN_SIDE, MAX_SIDE]`` = [40, 128] pixels: a crop then shows from 1/4 to 4/5 of the
   photo's shorter side, whole objects as well as textures;
2. the square window of that share of the photo is taken at a uniformly random position and
   resized to ``size`` x ``size`` with PIL's Lanczos filter (antialiased);
3. it is mirrored left-right with probability 1/2.

Grey photos are repeated to three channels, so the tree mixes colour and grey images as a real
folder of photos does. ``--crops-per-photo`` is a documented choice, not a measured one: 500
crops x 13 training photos gives 6,500 training images, more than any 32x32 crop of a 512-pixel
photo can hold of new content at these scales, and writes in seconds.

:data:`HELDOUT_PHOTOS` (a colour photo, a grey texture and a microscope slide) are written like
the others but never trained on: ``configs/photos32.yaml`` drops them with ``exclude_classes``,
and the unseen-data benchmarks read them from the datamodule's ``heldout_dataset``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jsonargparse import Namespace
from PIL import Image

from bdiff.checks import as_integer
from bdiff.console import ArgumentParser, exit_on_user_error

PHOTOS: dict[str, str] = {
    "astronaut": "astronaut",
    "brick": "brick",
    "camera": "camera",
    "cell": "cell",
    "chelsea": "chelsea",
    "clock": "clock",
    "coffee": "coffee",
    "coins": "coins",
    "grass": "grass",
    "gravel": "gravel",
    "hubble_deep_field": "hubble_deep_field",
    "immunohistochemistry": "immunohistochemistry",
    "moon": "moon",
    "motorcycle": "stereo_motorcycle",
    "retina": "retina",
    "rocket": "rocket",
}
"""Class folder name -> the ``skimage.data`` function that loads the photo (all ship with scikit-image)."""
HELDOUT_PHOTOS = ("brick", "coffee", "immunohistochemistry")
"""Photos written but never trained on (``exclude_classes`` in ``configs/photos32.yaml``)."""
MIN_SIDE, MAX_SIDE = 40, 128
"""Range of the photo's shorter side (pixels) after the random resize, before the crop."""


def load_photo(name: str) -> np.ndarray:
    """The photo ``name`` (a key of :data:`PHOTOS`) as an RGB array (H, W, 3) uint8, from scikit-image."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; the photos are {', '.join(PHOTOS)}")
    try:
        import skimage.data
    except ImportError as e:
        raise ModuleNotFoundError(
            "the photos dataset needs scikit-image (its photos ship inside the package): pip install -e \".[photos]\""
        ) from e
    image = getattr(skimage.data, PHOTOS[name])()
    if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity): the left view
        image = image[0]
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def random_crops(photo: np.ndarray, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random crops of ``photo`` (H, W, 3) uint8 -> (n, size, size, 3) uint8, as the module docstring says."""
    h, w = photo.shape[:2]
    source = Image.fromarray(photo)
    crops = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        side = int(rng.integers(max(MIN_SIDE, size), MAX_SIDE + 1))
        window = size * min(h, w) / side  # the crop's side in the photo's own pixels
        top = rng.uniform(0, h - window)
        left = rng.uniform(0, w - window)
        # Resize only the window (PIL's box argument): the same pixels as resizing the photo, then cropping.
        crop = np.asarray(source.resize((size, size), Image.LANCZOS, box=(left, top, left + window, top + window)))
        crops[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return crops


def write_photos(out: str | os.PathLike[str], crops_per_photo: int = 500, size: int = 32, seed: int = 0,
                 photos: Sequence[str] = tuple(PHOTOS)) -> Path:
    """Write ``out/<photo>/<index>.png`` for every photo; returns ``out``.

    The tree is built in a temporary folder beside ``out`` and renamed into place at the end,
    so an interrupted run leaves no half-written dataset. An existing, non-empty ``out`` is
    refused (delete it, or choose another folder).
    """
    as_integer("crops_per_photo", crops_per_photo, 1)
    as_integer("size", size, 8, MIN_SIDE)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{str(out)!r} already exists and is not an empty folder: delete it or choose another OUT.")
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in photos:
            folder = partial / name
            folder.mkdir()
            for i, crop in enumerate(random_crops(load_photo(name), crops_per_photo, size, rng)):
                Image.fromarray(crop).save(folder / f"{i:05d}.png")
        if out.exists():
            out.rmdir()  # empty (checked above)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def parse_args(argv: Sequence[str] | None = None) -> Namespace:
    """The command line (a bad option ends in one line and exit status 2)."""
    p = ArgumentParser(prog="python -m bdiff.datasets.photos", description=__doc__.splitlines()[0])
    p.add_argument("out", type=str, help="folder to create (must not exist, or be empty)")
    p.add_argument("--crops-per-photo", type=int, default=500, help="random crops written per photo")
    p.add_argument("--size", type=int, default=32, help="crop height = width in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops' scales, positions and flips")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m bdiff.datasets.photos OUT``: write the tree and say what was written."""
    args = parse_args(argv)
    out = write_photos(args.out, args.crops_per_photo, args.size, args.seed)
    held = ", ".join(HELDOUT_PHOTOS)
    print(f"wrote {len(PHOTOS)} photos x {args.crops_per_photo} crops of {args.size}x{args.size} to {out} "
          f"({held} are held out of training by configs/photos32.yaml)")
    return out


if __name__ == "__main__":
    exit_on_user_error(main)
