"""LightningDataModules for image datasets.

Every batch from ``train_dataloader()`` / ``val_dataloader()`` is a single float32 tensor
``x0`` of shape ``(B, C, H, W)`` with values in ``[-1, 1]`` (class labels are dropped).

``exclude_classes`` (every labelled dataset) removes chosen classes from both splits, after
the same seeded split as without it, so the seen-class validation images are the default
run's; ``heldout_dataset`` then holds every image of the excluded classes (never trained on).

``fraction`` keeps a seeded share of the training split, and ``class_fraction`` (labelled
datasets) a share of chosen classes' training images, e.g. ``{3: 0.05}``: the regimes where a
model is unsure (``benchmarks/where_uncertainty_pays.py``). Validation stays the full split's.

Datasets:

* :class:`DigitsDataModule` -- scikit-learn's bundled 8x8 digits (no download, the default).
* :class:`MNISTDataModule`, :class:`FashionMNISTDataModule`, :class:`CIFAR10DataModule` --
  torchvision datasets; the official train set is split into train/val with a seeded split.
* :class:`ImageFolderDataModule` -- any folder laid out as ``root/<class>/<image>.png``.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from bdiff.checks import as_integer
from bdiff.datasets import load_digits, seeded_split


def _to_symmetric(x: torch.Tensor) -> torch.Tensor:
    """Map a tensor in ``[0, 1]`` (as produced by ``ToTensor``) to ``[-1, 1]``."""
    return x * 2.0 - 1.0


def _image_transform(image_size: int | None, crop: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float32 tensor ``(C, H, W)`` in ``[-1, 1]``, optionally resized to ``image_size``."""
    steps: list[Callable[..., Any]] = []
    if image_size is not None:
        steps.append(transforms.Resize(image_size))
        if crop:
            steps.append(transforms.CenterCrop(image_size))
    steps += [transforms.ToTensor(), transforms.Lambda(_to_symmetric)]
    return transforms.Compose(steps)


def _train_fraction(name: str, value: Any) -> float:
    """A share of the training split in (0, 1], or a ValueError that names ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1] (the share of training images kept), got {value!r}.")
    return float(value)


def _load_image(path: str, mode: str) -> Image.Image:
    """Open ``path`` with PIL and convert it to ``mode`` ("L" or "RGB"); errors name the file."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(
            f"Could not read image file {path!r} ({type(e).__name__}: {e}). "
            "Remove or replace this file; it is not a valid image."
        ) from e


class _ImagesOnly(Dataset):
    """Wrap a dataset yielding ``(image, label)`` so that ``__getitem__`` returns only the image."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset[index][0]


class _TensorImages(Dataset):
    """In-memory images: a float32 tensor ``(N, C, H, W)``; ``__getitem__`` returns ``(C, H, W)``."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def _check_image_size(image_size: Any) -> None:
    as_integer("image_size", image_size, 4)


class ImageDataModule(LightningDataModule):
    """Base class: seeded train/val split of one image dataset and the two dataloaders.

    Subclasses set ``self._image_size`` / ``self._channels`` in ``__init__`` and implement
    :meth:`_load_full`, which returns the whole (pre-split) dataset of ``(C, H, W)`` tensors,
    and, for ``exclude_classes``, :meth:`_class_labels`.
    """

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        exclude_classes: list[int | str] | None = None,
        fraction: float = 1.0,
        class_fraction: dict[int | str, float] | None = None,
    ) -> None:
        super().__init__()
        if exclude_classes is not None and (
            isinstance(exclude_classes, (str, bytes)) or not all(isinstance(c, (int, str)) for c in exclude_classes)
        ):
            raise ValueError(f"exclude_classes must be a list of class indices or names, got {exclude_classes!r}.")
        self.exclude_classes = list(exclude_classes or [])
        self.fraction = _train_fraction("fraction", fraction)
        if class_fraction is not None and not isinstance(class_fraction, dict):
            raise ValueError(f"class_fraction must map classes (indices or names) to fractions in (0, 1], got {class_fraction!r}.")
        self.class_fraction = {c: _train_fraction(f"class_fraction[{c!r}]", f) for c, f in (class_fraction or {}).items()}
        as_integer("batch_size", batch_size, 1)
        as_integer("num_workers", num_workers, 0)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}.")
        as_integer("seed", seed, -(2**63), 2**64 - 1)  # the range torch.Generator.manual_seed takes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self._image_size: int = 0
        self._channels: int = 0
        self._train: Dataset | None = None
        self._val: Dataset | None = None
        self._heldout: Dataset | None = None

    # -- properties ---------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """Height == width of every image (valid right after ``__init__``)."""
        return self._image_size

    @property
    def channels(self) -> int:
        """Number of image channels C (1 or 3; valid right after ``__init__``)."""
        return self._channels

    def _require_setup(self, what: Dataset | None) -> Dataset:
        if what is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called before using the datasets.")
        return what

    @property
    def train_dataset(self) -> Dataset:
        """Training split; items are float32 tensors ``(C, H, W)`` in ``[-1, 1]``."""
        return self._require_setup(self._train)

    @property
    def val_dataset(self) -> Dataset:
        """Validation split; items are float32 tensors ``(C, H, W)`` in ``[-1, 1]``."""
        return self._require_setup(self._val)

    @property
    def heldout_dataset(self) -> Dataset:
        """Every image of ``exclude_classes`` (from both splits; empty without exclusions)."""
        self._require_setup(self._train)
        return self._heldout  # type: ignore[return-value]

    @property
    def num_train(self) -> int:
        """Number of training images (the Bayesian KL term is divided by it)."""
        return len(self.train_dataset)  # type: ignore[arg-type]

    # -- data ---------------------------------------------------------------------------------
    def _load_full(self) -> Dataset:
        """Return the full dataset (before the train/val split); never downloads."""
        raise NotImplementedError

    def _describe(self) -> str:
        """Human-readable name of the data source, used in error messages."""
        return type(self).__name__

    def _class_labels(self, full: Dataset) -> tuple[list[int], list[str]]:
        """(class index of every image of ``full``, class names by index); for ``exclude_classes``."""
        raise ValueError(f"{self._describe()} has no class labels: exclude_classes and class_fraction cannot be used with it.")

    def _class_index(self, option: str, c: int | str, names: list[str]) -> int:
        """The index of class ``c`` (an index or a name) among ``names``, or a ValueError naming ``option``."""
        if isinstance(c, str) and c in names:
            return names.index(c)
        if isinstance(c, int) and 0 <= c < len(names):
            return c
        raise ValueError(
            f"{option}: {c!r} is not a class of {self._describe()}; classes are 0..{len(names) - 1} or the names {names}."
        )

    def _excluded_indices(self, full: Dataset) -> set[int]:
        """Indices into ``full`` of the images whose class is in ``exclude_classes``."""
        labels, names = self._class_labels(full)
        wanted = {self._class_index("exclude_classes", c, names) for c in self.exclude_classes}
        if len(wanted) == len(names):
            raise ValueError(f"exclude_classes removes every class of {self._describe()}: nothing left to train on.")
        return {i for i, label in enumerate(labels) if label in wanted}

    def setup(self, stage: str | None = None) -> None:
        """Load the data and make the seeded train/val split (idempotent; never downloads)."""
        if self._train is not None:
            return
        full = self._load_full()
        n = len(full)  # type: ignore[arg-type]
        all_train, all_val = seeded_split(n, self.val_fraction, self.seed)
        if not all_train:
            raise ValueError(
                f"{self._describe()} has only {n} image(s): too few for a train/val split with "
                f"val_fraction={self.val_fraction}. Add more images (at least 2) or lower val_fraction."
            )
        excluded = self._excluded_indices(full) if self.exclude_classes else set()
        train = [i for i in all_train if i not in excluded]
        val = [i for i in all_val if i not in excluded]
        if not train or not val:
            raise ValueError(
                f"{self._describe()} without classes {self.exclude_classes} leaves {len(train)} training and "
                f"{len(val)} validation image(s); both must be >= 1. Exclude fewer classes or raise val_fraction."
            )
        train = self._subsample(full, train)
        self._train, self._val = Subset(full, train), Subset(full, val)
        self._heldout = Subset(full, sorted(excluded))

    def split_labels(self, split: str) -> tuple[torch.Tensor, list[str]]:
        """Class labels of the ``"train"``, ``"val"`` or ``"heldout"`` split, renumbered 0..K-1.

        Returns ``(labels (N,) int64, names)``: ``labels[i]`` is the class of the split's i-th item and
        ``names[k]`` the class label k stands for. Train and val are numbered over the classes kept
        for training (``exclude_classes`` removed), held-out over the excluded ones. For a
        classifier of the data's own classes: the feature spaces of :mod:`bdiff.metrics.features`.
        """
        subsets = {"train": self.train_dataset, "val": self.val_dataset, "heldout": self.heldout_dataset}
        if split not in subsets:
            raise ValueError(f"split must be one of {', '.join(subsets)}, got {split!r}")
        subset = subsets[split]
        labels, names = self._class_labels(subset.dataset)  # type: ignore[attr-defined]
        excluded = {self._class_index("exclude_classes", c, names) for c in self.exclude_classes}
        kept = [k for k in range(len(names)) if (k in excluded) == (split == "heldout")]
        renumber = {k: i for i, k in enumerate(kept)}
        split_labels = [renumber[labels[i]] for i in subset.indices]  # type: ignore[attr-defined]
        return torch.tensor(split_labels, dtype=torch.int64), [names[k] for k in kept]

    def _subsample(self, full: Dataset, train: list[int]) -> list[int]:
        """The training indices ``fraction`` and ``class_fraction`` keep (seeded; validation is untouched).

        Each kept share is the first ``max(1, round(share * n))`` of the (already shuffled) indices, so
        a smaller share keeps a subset of a larger one's images.
        """
        if self.class_fraction:
            labels, names = self._class_labels(full)
            shares = {self._class_index("class_fraction", c, names): f for c, f in self.class_fraction.items()}
            kept = set()
            for cls, share in shares.items():
                members = [i for i in train if labels[i] == cls]
                kept.update(members[: max(1, round(share * len(members)))])
            train = [i for i in train if labels[i] not in shares or i in kept]
        return train[: max(1, round(self.fraction * len(train)))]

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.batch_size,  # type: ignore[arg-type]
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches ``x0`` of shape ``(B, C, H, W)``, float32 in ``[-1, 1]``."""
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        """Unshuffled batches ``x0`` of shape ``(B, C, H, W)``, float32 in ``[-1, 1]``."""
        return self._loader(self.val_dataset, train=False)


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled digits: 1797 images, shape ``(1, 8, 8)``, values 0..16 mapped to [-1, 1]."""

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        exclude_classes: list[int | str] | None = None,
        fraction: float = 1.0,
        class_fraction: dict[int | str, float] | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed, exclude_classes, fraction, class_fraction)
        self.save_hyperparameters()
        self._image_size, self._channels = 8, 1

    def _describe(self) -> str:
        return "sklearn digits"

    def _class_labels(self, full: Dataset) -> tuple[list[int], list[str]]:
        return load_digits()[1].tolist(), [str(d) for d in range(10)]

    def _load_full(self) -> Dataset:
        return _TensorImages(_to_symmetric(load_digits()[0]))  # (1797, 1, 8, 8)


class _TorchvisionDataModule(ImageDataModule):
    """Shared logic for torchvision datasets that live under ``root`` and can be downloaded."""

    tv_class: type[datasets.VisionDataset]
    native_size: int
    native_channels: int

    def __init__(
        self,
        root: str = "data",
        download: bool = True,
        image_size: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        exclude_classes: list[int | str] | None = None,
        fraction: float = 1.0,
        class_fraction: dict[int | str, float] | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed, exclude_classes, fraction, class_fraction)
        if image_size is not None:
            _check_image_size(image_size)
        self.save_hyperparameters()
        self.root = str(root)
        self.download = bool(download)
        self._resize = image_size
        self._image_size = self.native_size if image_size is None else image_size
        self._channels = self.native_channels

    def _data_dir(self) -> str:
        """Folder that torchvision expects to hold the files."""
        raise NotImplementedError

    def _describe(self) -> str:
        return f"{self.tv_class.__name__} at {self._data_dir()!r}"

    def prepare_data(self) -> None:
        """Download the dataset into ``root`` if ``download=True`` (no-op if already present)."""
        if not self.download:
            return
        try:
            self.tv_class(self.root, train=True, download=True)
        except Exception as e:
            raise RuntimeError(
                f"Downloading {self.tv_class.__name__} into {self.root!r} failed ({e}). Check the internet "
                f"connection, or place the files in {self._data_dir()!r} yourself and set download: false."
            ) from e

    def _load_full(self) -> Dataset:
        name = self.tv_class.__name__
        try:
            ds = self.tv_class(self.root, train=True, download=False, transform=_image_transform(self._resize))
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted ..."
            if "not found" not in str(e).lower():  # e.g. a truncated file: the data cannot take its declared shape
                raise ValueError(f"{name} files in {self._data_dir()!r} are malformed ({e}); delete them and download again") from e
            raise FileNotFoundError(
                f"{name} files not found (or corrupted) in {self._data_dir()!r} ({e}). "
                "Set download: true (prepare_data(), which the Trainer calls automatically, then downloads "
                "them), or point root at the folder that contains them."
            ) from e
        except Exception as e:  # torchvision's parsers assert, or raise Type/Value/IndexError, on malformed files
            raise ValueError(f"{name} files in {self._data_dir()!r} are malformed ({type(e).__name__}: {e}); "
                             "delete them and download again") from e
        self._check_items(ds)
        return _ImagesOnly(ds)

    def _class_labels(self, full: Dataset) -> tuple[list[int], list[str]]:
        ds = full.dataset  # type: ignore[attr-defined]  (_ImagesOnly around the torchvision dataset)
        return [int(y) for y in ds.targets], [str(c) for c in ds.classes]

    def _check_items(self, ds: Dataset) -> None:
        """ValueError unless labels and images agree in number and the first image has the promised shape."""
        name, where = self.tv_class.__name__, repr(self._data_dir())
        targets = getattr(ds, "targets", None)
        if targets is not None and len(targets) != len(ds):  # type: ignore[arg-type]
            raise ValueError(f"{name} files in {where} hold {len(ds)} images but {len(targets)} labels")  # type: ignore[arg-type]
        if len(ds) == 0:  # type: ignore[arg-type]
            return  # setup() names the empty dataset
        try:
            shape = tuple(ds[0][0].shape)
        except Exception as e:
            raise ValueError(f"{name} files in {where}: the first image cannot be read ({type(e).__name__}: {e})") from e
        expected = (self._channels, self._image_size, self._image_size)
        if shape != expected:
            raise ValueError(f"{name} files in {where} hold images of shape {shape}, expected {expected}")


class MNISTDataModule(_TorchvisionDataModule):
    """MNIST digits: ``(1, 28, 28)`` natively, files in ``<root>/MNIST/raw``."""

    tv_class = datasets.MNIST
    native_size, native_channels = 28, 1

    def _data_dir(self) -> str:
        return os.path.join(self.root, self.tv_class.__name__, "raw")


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST: ``(1, 28, 28)`` natively, files in ``<root>/FashionMNIST/raw``."""

    tv_class = datasets.FashionMNIST


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10: ``(3, 32, 32)`` natively, files in ``<root>/cifar-10-batches-py``."""

    tv_class = datasets.CIFAR10
    native_size, native_channels = 32, 3

    def _data_dir(self) -> str:
        return os.path.join(self.root, datasets.CIFAR10.base_folder)


class ImageFolderDataModule(ImageDataModule):
    """Any folder of images laid out as ``root/<class>/<image>.png`` (class labels used only by ``exclude_classes``).

    Images are resized (shorter side) and center-cropped to ``image_size`` and converted to
    grayscale (``channels=1``) or RGB (``channels=3``): items have shape ``(channels, image_size, image_size)``.
    """

    def __init__(
        self,
        root: str,
        image_size: int,
        channels: int = 3,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        exclude_classes: list[int | str] | None = None,
        fraction: float = 1.0,
        class_fraction: dict[int | str, float] | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed, exclude_classes, fraction, class_fraction)
        _check_image_size(image_size)
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.")
        self.root = str(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"Image folder {self.root!r} does not exist. Expected the layout root/<class>/<image>.png "
                "(at least one class sub-folder)."
            )
        self.save_hyperparameters()
        self._image_size, self._channels = image_size, channels

    def _describe(self) -> str:
        return f"image folder {self.root!r}"

    def _class_labels(self, full: Dataset) -> tuple[list[int], list[str]]:
        ds = full.dataset  # type: ignore[attr-defined]  (_ImagesOnly around the ImageFolder)
        return list(ds.targets), list(ds.classes)

    def _load_full(self) -> Dataset:
        layout = "Expected the layout root/<class>/<image>.png with at least one image in a class sub-folder."
        loader = functools.partial(_load_image, mode="L" if self._channels == 1 else "RGB")
        try:
            ds = datasets.ImageFolder(
                self.root, transform=_image_transform(self._image_size, crop=True), loader=loader, allow_empty=True
            )
        except FileNotFoundError as e:  # no class sub-folder at all
            raise FileNotFoundError(f"No class sub-folders in {self.root!r} ({e}). {layout}") from e
        if len(ds) == 0:
            exts = ", ".join(datasets.folder.IMG_EXTENSIONS)
            raise FileNotFoundError(f"No images ({exts}) found in {self.root!r}. {layout}")
        return _ImagesOnly(ds)


DATAMODULES: dict[str, type[ImageDataModule]] = {
    "digits": DigitsDataModule,
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "image_folder": ImageFolderDataModule,
}
"""Dataset name -> DataModule class."""
