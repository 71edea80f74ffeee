"""Tests for bdiff.lit.data: the real torchvision loaders on tiny files written in their on-disk formats.

No test touches the network: the files are written into ``tmp_path`` and torchvision's download
helpers are replaced by a function that fails loudly.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.mnist
from PIL import Image

from bdiff.lit.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt by torchvision to download fails the test instead of reaching the network."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("tests must not download anything")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", fail)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fail)


def _check_batch(x: torch.Tensor, batch: int, channels: int, size: int) -> None:
    assert isinstance(x, torch.Tensor)
    assert x.dtype == torch.float32
    assert x.shape == (batch, channels, size, size)
    assert x.min() >= -1.0 and x.max() <= 1.0


# --------------------------------------------------------------------------------------- digits
def test_digits_shapes_split_and_hparams() -> None:
    dm = DigitsDataModule(batch_size=64)
    assert (dm.image_size, dm.channels) == (8, 1)  # valid before setup
    assert dm.hparams["batch_size"] == 64
    dm.setup("fit")
    n_val = len(dm.val_dataset)
    assert n_val == 180 and dm.num_train == 1797 - n_val == len(dm.train_dataset)
    x = next(iter(dm.train_dataloader()))
    _check_batch(x, 64, 1, 8)
    assert x.min() == -1.0 and x.max() == 1.0  # 0 -> -1 and 16 -> 1
    assert len(dm.train_dataloader()) == dm.num_train // 64  # drop_last
    _check_batch(next(iter(dm.val_dataloader())), 64, 1, 8)


def test_digits_split_is_seeded() -> None:
    def val_images(seed: int) -> torch.Tensor:
        dm = DigitsDataModule(seed=seed)
        dm.setup()
        return torch.stack([dm.val_dataset[i] for i in range(len(dm.val_dataset))])

    assert torch.equal(val_images(0), val_images(0))
    assert not torch.equal(val_images(0), val_images(1))


def test_dataloader_settings() -> None:
    dm = DigitsDataModule(batch_size=2000, num_workers=2)
    dm.setup()
    dl = dm.train_dataloader()
    assert dl.persistent_workers and dl.num_workers == 2
    assert not dl.drop_last  # training set smaller than one batch: keep it
    with pytest.raises(RuntimeError, match="setup"):
        _ = DigitsDataModule().num_train


# ---------------------------------------------------------------------------------------- MNIST
def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the big-endian idx format (magic 0x08 = ubyte, then ndim)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist(root: Path, folder: str, n_train: int = 20, n_test: int = 5) -> None:
    """torchvision reads the *uncompressed* files ``<root>/<ClassName>/raw/{train,t10k}-*-ubyte``."""
    rng = np.random.default_rng(0)
    raw = root / folder / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        images[0] = 0
        images[1] = 255
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, size=n))


@pytest.mark.parametrize(("cls", "folder"), [(MNISTDataModule, "MNIST"), (FashionMNISTDataModule, "FashionMNIST")])
def test_mnist_like(tmp_path: Path, cls: type[MNISTDataModule], folder: str) -> None:
    _write_mnist(tmp_path, folder)
    dm = cls(root=str(tmp_path), download=True, batch_size=8, val_fraction=0.25)
    assert (dm.image_size, dm.channels) == (28, 1)
    assert dm.hparams["root"] == str(tmp_path) and dm.hparams["image_size"] is None
    dm.prepare_data()  # files already present: torchvision does not download
    dm.setup("fit")
    assert (dm.num_train, len(dm.val_dataset)) == (15, 5)
    x = next(iter(dm.train_dataloader()))
    _check_batch(x, 8, 1, 28)
    full = torch.stack([dm.train_dataset[i] for i in range(15)] + [dm.val_dataset[i] for i in range(5)])
    assert full.min() == -1.0 and full.max() == 1.0

    resized = cls(root=str(tmp_path), download=False, image_size=16, batch_size=4)
    resized.setup()
    _check_batch(next(iter(resized.val_dataloader())), 2, 1, 16)


def test_mnist_missing_files(tmp_path: Path) -> None:
    dm = MNISTDataModule(root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(FileNotFoundError, match=r"(?s)nowhere.*MNIST.*download: true"):
        dm.setup()


# ------------------------------------------------------------------------------------- CIFAR-10
def _write_cifar(root: Path, per_batch: int = 4) -> None:
    """Real CIFAR-10 python format: pickled dicts with 'data' (N, 3072) uint8 and 'labels'."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8), "labels": [0] * per_batch}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def test_cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torchvision's CIFAR10 verifies the md5 of every file (data batches and batches.meta); our
    # synthetic files cannot match the real checksums, so for this test only we keep torchvision's
    # existence check but drop the md5 comparison (check_integrity(path, md5) -> file exists).
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    _write_cifar(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), download=True, batch_size=6, val_fraction=0.2)
    assert (dm.image_size, dm.channels) == (32, 3)
    dm.prepare_data()  # integrity check passes, so no download is attempted
    dm.setup()
    assert (dm.num_train, len(dm.val_dataset)) == (16, 4)
    _check_batch(next(iter(dm.train_dataloader())), 6, 3, 32)
    resized = CIFAR10DataModule(root=str(tmp_path), download=False, image_size=8, batch_size=4)
    resized.setup()
    _check_batch(next(iter(resized.val_dataloader())), 2, 3, 8)


def test_cifar10_missing_files(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(root=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py"):
        dm.setup()


# ---------------------------------------------------------------------------------- ImageFolder
def _write_folder(root: Path) -> None:
    """Two classes; RGB and grayscale PNGs of different sizes (one all white, one all black)."""
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir(parents=True)
    Image.new("RGB", (20, 12), (255, 255, 255)).save(root / "cats" / "white.png")
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "cats" / "noise.png")
    Image.new("L", (10, 16), 0).save(root / "dogs" / "black.png")
    Image.new("L", (9, 9), 128).save(root / "dogs" / "gray.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder(tmp_path: Path, channels: int) -> None:
    _write_folder(tmp_path)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, channels=channels, batch_size=8, val_fraction=0.25)
    assert (dm.image_size, dm.channels) == (8, channels)
    dm.setup()
    assert (dm.num_train, len(dm.val_dataset)) == (3, 1)
    x = next(iter(dm.train_dataloader()))
    _check_batch(x, 3, channels, 8)  # 3 < batch_size: drop_last is off
    images = torch.cat([x, next(iter(dm.val_dataloader()))])
    flat = images.flatten(1)
    assert (flat == 1.0).all(dim=1).any() and (flat == -1.0).all(dim=1).any()  # white and black images


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataModule(root=str(tmp_path / "missing"), image_size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"root/<class>/<image>\.png"):
        ImageFolderDataModule(root=str(empty), image_size=8).setup()
    (empty / "cls").mkdir()
    (empty / "cls" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="No images"):
        ImageFolderDataModule(root=str(empty), image_size=8).setup()
    Image.new("RGB", (8, 8)).save(empty / "cls" / "only.png")
    with pytest.raises(ValueError, match="only 1 image"):
        ImageFolderDataModule(root=str(empty), image_size=8).setup()


def test_image_folder_corrupt_file(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    (tmp_path / "dogs" / "broken.png").write_bytes(np.random.default_rng(0).bytes(200))
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, val_fraction=0.2)
    dm.setup()
    with pytest.raises(ValueError, match=r"broken\.png"):
        for ds in (dm.train_dataset, dm.val_dataset):
            for i in range(len(ds)):
                ds[i]


# ------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channels": 2}, "channels"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"image_size": 2}, "image_size"),
        ({"image_size": 8.5}, "image_size"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"root": str(tmp_path), "image_size": 8, "channels": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        ImageFolderDataModule(**args)


def test_bad_arguments_other_modules(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=-1)
    with pytest.raises(ValueError, match="image_size"):
        MNISTDataModule(root=str(tmp_path), image_size=3)


# ------------------------------------------------------------------------------ exclude_classes
def test_digits_exclude_classes_keeps_the_default_split_of_the_seen_classes() -> None:
    from sklearn.datasets import load_digits

    labels = torch.as_tensor(load_digits().target)
    full, held = DigitsDataModule(), DigitsDataModule(exclude_classes=[3])
    full.setup(), held.setup()
    assert held.hparams["exclude_classes"] == [3]
    train_idx, val_idx = held.train_dataset.indices, held.val_dataset.indices
    assert (labels[train_idx] != 3).all() and (labels[val_idx] != 3).all()
    assert val_idx == [i for i in full.val_dataset.indices if labels[i] != 3]
    assert train_idx == [i for i in full.train_dataset.indices if labels[i] != 3]
    assert held.num_train == len(train_idx) < full.num_train
    heldout = held.heldout_dataset
    assert len(heldout) == int((labels == 3).sum()) and (labels[heldout.indices] == 3).all()
    assert len(full.heldout_dataset) == 0
    x = next(iter(held.train_dataloader()))
    _check_batch(x, 128, 1, 8)


def test_exclude_classes_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a class of sklearn digits"):
        DigitsDataModule(exclude_classes=[10]).setup()
    with pytest.raises(ValueError, match="every class"):
        DigitsDataModule(exclude_classes=list(range(10))).setup()
    with pytest.raises(ValueError, match="list of class indices or names"):
        DigitsDataModule(exclude_classes="3")  # type: ignore[arg-type]


def test_image_folder_excludes_classes_by_name_or_index(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    for excluded in (["dogs"], [1]):
        dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, channels=1, val_fraction=0.25, seed=1,
                                   exclude_classes=excluded)
        dm.setup()
        paths = lambda ds: [ds.dataset.dataset.samples[i][0] for i in ds.indices]  # noqa: E731
        assert all("cats" in p for p in paths(dm.train_dataset) + paths(dm.val_dataset))
        assert sorted(Path(p).name for p in paths(dm.heldout_dataset)) == ["black.png", "gray.png"]
    with pytest.raises(ValueError, match=r"classes are 0\.\.1 or the names \['cats', 'dogs'\]"):
        ImageFolderDataModule(root=str(tmp_path), image_size=8, exclude_classes=["birds"]).setup()


def test_torchvision_datasets_exclude_classes_by_label(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "MNIST", n_train=60)
    dm = MNISTDataModule(root=str(tmp_path), download=False, exclude_classes=[0, "1 - one"])
    dm.setup()
    targets = dm.train_dataset.dataset.dataset.targets
    assert all(int(targets[i]) > 1 for i in dm.train_dataset.indices + dm.val_dataset.indices)
    assert sorted(dm.heldout_dataset.indices) == [i for i in range(60) if int(targets[i]) <= 1]


def test_fraction_keeps_a_seeded_subset_of_the_training_split_and_the_whole_validation_split() -> None:
    full, tenth = DigitsDataModule(), DigitsDataModule(fraction=0.1)
    full.setup(), tenth.setup()
    assert tenth.num_train == round(0.1 * full.num_train)
    assert set(tenth.train_dataset.indices) < set(full.train_dataset.indices)
    assert tenth.val_dataset.indices == full.val_dataset.indices  # results stay comparable with the full run's
    third = DigitsDataModule(fraction=0.3)
    third.setup()
    assert set(tenth.train_dataset.indices) < set(third.train_dataset.indices)  # a smaller share is a subset


def test_class_fraction_down_samples_one_class_only() -> None:
    from sklearn.datasets import load_digits

    labels = load_digits().target
    full, rare = DigitsDataModule(), DigitsDataModule(class_fraction={3: 0.05})
    full.setup(), rare.setup()
    count = lambda dm, c: int((labels[dm.train_dataset.indices] == c).sum())  # noqa: E731
    assert count(rare, 3) == round(0.05 * count(full, 3))
    assert all(count(rare, c) == count(full, c) for c in range(10) if c != 3)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"fraction": 0}, r"fraction must be a number in \(0, 1\]"),
    ({"fraction": 1.5}, r"fraction must be a number in \(0, 1\]"),
    ({"class_fraction": [3]}, "class_fraction must map classes"),
    ({"class_fraction": {3: 0}}, r"class_fraction\[3\] must be a number in \(0, 1\]"),
])
def test_bad_fractions_are_refused_with_the_option_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_class_fraction_names_an_unknown_class() -> None:
    with pytest.raises(ValueError, match="class_fraction: 12 is not a class"):
        DigitsDataModule(class_fraction={12: 0.5}).setup()
